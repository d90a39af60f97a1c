"""Parity with the authors' E2Former-V2: their state dict imported, their numbers reproduced.

The fixture (../shared/data/reference_parity, README there) holds the numbers of their unmodified
code in float64 on a tiny configuration: energies, direct / autograd / finite-difference forces,
neighbour lists and every intermediate stage for six structures, plus the key/shape manifest of the
paper-size model. Every structure is padded to one shape so each function compiles once.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2f_testing import REFERENCE_PARITY, authors_graph
from e2former_jax.config import REFERENCE_NUMERICS, AttentionImpl, MessagePath, paper_config
from e2former_jax.interop.authors_checkpoint import import_state_dict, plan_import
from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import build_graph
from e2former_jax.nn.model import E2Former
from e2former_jax.potential import energy_and_forces
from e2former_jax.structure import Structure

pytestmark = pytest.mark.skipif(not REFERENCE_PARITY.is_dir(),
                                reason=f"the reference parity fixture is absent ({REFERENCE_PARITY})")

STRUCTURES = range(5)  # s0-s4; s5 is the frame-quirk demonstration
QUIRK = 5
# float64 budgets of the issue; measured (this code, CPU): energies <= 1.4e-15 and direct forces
# <= 5e-15 relative, stages <= 8e-15, conservative forces within 8e-10 of the Richardson differences
# (the differences' own truncation: their autograd shows the same residuals).
RELATIVE_TOLERANCE = 1e-10
FD_TOLERANCE = 1e-8  # eV/A; the Richardson differences themselves are good to ~3e-10
FLOAT32_TOLERANCE = 1e-5
# Atom slots of every padded graph (s4 has 54 atoms) and one spare molecule slot for the padding.
NUM_NODES, NUM_MOLECULES = 64, 2
# Their autograd misses these components at the atoms whose frame they detach (README table).
QUIRK_ATOMS = (0, 1)
QUIRK_AUTOGRAD_ERROR = 1e-2


@functools.cache
def fixture():
  data = np.load(REFERENCE_PARITY / "inputs_outputs.npz")
  return {key: data[key] for key in data.files}


@functools.cache
def reference_config():
  return json.loads((REFERENCE_PARITY / "tiny_config.json").read_text())


def structure(s: int) -> dict:
  return {key[len(f"s{s}_"):]: value for key, value in fixture().items() if key.startswith(f"s{s}_")}


def imported(dtype):
  state = dict(np.load(REFERENCE_PARITY / "tiny_state_dict.npz"))
  return import_state_dict(state, reference_config=reference_config(), dtype=dtype)


def our_graph(s: int, dtype):
  """Our neighbour search in the authors' slot mode, padded."""
  io = structure(s)
  st = Structure(io["numbers"], io["positions"], charge=int(io["charge"]), spin=int(io["spin"]))
  graph = build_graph([st], cutoff=4.5, max_neighbors=16, num_nodes=NUM_NODES,
                      num_molecules=NUM_MOLECULES, dtype=dtype, reference_slots=True)
  return jax.tree.map(jnp.asarray, graph)


def their_graph(s: int, dtype):
  """Their neighbour arrays, padded."""
  return authors_graph(structure(s), num_nodes=NUM_NODES, num_molecules=NUM_MOLECULES,
                       max_neighbors=16, dtype=dtype)


@functools.cache
def float64_results():
  """Per structure: the model's outputs and stages on their neighbour arrays, and conservative
  forces on our own reference-slot graphs (float64, one compilation each)."""
  with jax.enable_x64(True):
    model_in = imported(np.float64)
    model = E2Former(model_in.config)

    @jax.jit
    def stages(params, graph):
      return model.apply(params, graph, capture_intermediates=True, mutable=["intermediates"])

    forces = jax.jit(functools.partial(energy_and_forces, model))
    results = []
    for s in range(QUIRK + 1):
      out, state = stages(model_in.params, their_graph(s, np.float64))
      energy, conservative = forces(model_in.params, our_graph(s, np.float64))
      results.append(jax.tree.map(np.asarray, dict(
          energy=out.energy[0], direct=out.direct_forces, stages=state["intermediates"],
          energy_ours=energy[0], conservative=conservative)))
    return results


def relative_error(actual, expected) -> float:
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_energies_and_direct_forces_equal_theirs():
  for s in [*STRUCTURES, QUIRK]:
    io, n = structure(s), len(structure(s)["numbers"])
    got = float64_results()[s]
    assert relative_error(got["energy"], io["energy"]) <= RELATIVE_TOLERANCE, s
    assert relative_error(got["direct"][:n], io["forces_direct"]) <= RELATIVE_TOLERANCE, s
    # Our own neighbour search gives the same energy.
    assert relative_error(got["energy_ours"], io["energy"]) <= RELATIVE_TOLERANCE, s


def test_conservative_forces_equal_finite_differences():
  for s in STRUCTURES:
    io, n = structure(s), len(structure(s)["numbers"])
    forces = float64_results()[s]["conservative"]
    assert np.max(np.abs(forces[:n] - io["forces_fd_richardson"])) <= FD_TOLERANCE, s
    assert np.all(forces[n:] == 0)


def test_where_their_autograd_is_wrong_ours_equals_finite_differences():
  """s5: C at the origin, H1 on +y. Their frame code detaches the Euler angles of these two atoms,
  so their autograd forces miss components there; ours (global-frame CG, D3) do not."""
  io, n = structure(QUIRK), len(structure(QUIRK)["numbers"])
  fd = io["forces_fd_richardson"]
  theirs = np.abs(io["forces_autograd"] - fd).max(axis=1)
  assert np.all(theirs[list(QUIRK_ATOMS)] > QUIRK_AUTOGRAD_ERROR)  # the fixture's premise
  ours = float64_results()[QUIRK]["conservative"][:n]
  assert np.max(np.abs(ours - fd)) <= FD_TOLERANCE


def _stage(stages, *path):
  node = stages
  for name in path:
    node = node[name]
  return node[0]


def test_every_stage_equals_theirs():
  """The intermediate features after every stage, so that a future mismatch names its stage."""
  config = imported(np.float32).config
  for s in [*STRUCTURES, QUIRK]:
    io, n = structure(s), len(structure(s)["numbers"])
    k = io["nbr"].shape[1]
    stages = float64_results()[s]["stages"]
    ours = {"sys_embedding": _stage(stages, "molecule", "__call__")[0],
            "embed_out": _stage(stages, "edge_degree", "__call__")[:n],
            "final_out": _stage(stages, "final_norm", "__call__")[:n]}
    for b in range(config.num_layers):
      block = stages[f"block_{b}"]
      attention = block["attention"]
      ours |= {f"block{b}_attn_in": _stage(block, "attn_in")[:n],
               f"block{b}_query": _stage(attention, "query", "__call__")[:n],
               f"block{b}_key": _stage(attention, "key", "__call__")[:n],
               # Our gate and input-head column blocks (RadialMLP.out_blocks) side by side.
               f"block{b}_edge_mlp": np.concatenate(_stage(attention, "edge_gates", "__call__"),
                                                   axis=-1)[:n, :k],
               f"block{b}_value": _stage(attention, "value", "__call__")[:n],
               f"block{b}_tp_out": _stage(attention, "path_mix", "__call__")[:n],
               f"block{b}_attn_out": _stage(attention, "__call__")[:n],
               f"block{b}_ffn_out": _stage(block, "ffn", "__call__")[:n],
               f"block{b}_out": _stage(block, "__call__")[:n]}
    expected_stages = {key for key in io if key == "sys_embedding" or key.endswith(
        ("embed_out", "final_out", "_attn_in", "_query", "_key", "_edge_mlp", "_value", "_tp_out",
         "_attn_out", "_ffn_out", "_out"))}
    assert set(ours) == expected_stages
    for name, value in ours.items():
      assert relative_error(value, io[name]) <= RELATIVE_TOLERANCE, (s, name)


def test_our_reference_slots_are_theirs():
  """build_graph(reference_slots=True): per-molecule K, the in-cutoff mask and the atoms beyond the
  cutoff in masked slots, as their neighbour arrays (row order aside)."""
  for s in [*STRUCTURES, QUIRK]:
    io = structure(s)
    n, k = io["nbr"].shape
    graph = our_graph(s, np.float64)
    idx, mask = np.asarray(graph.nbr_idx)[:n], np.asarray(graph.nbr_mask)[:n]
    assert np.all(idx[:, k:] == NUM_NODES) and not mask[:, k:].any()
    np.testing.assert_array_equal(np.sort(idx[:, :k], axis=1), np.sort(io["nbr"], axis=1))
    np.testing.assert_array_equal(mask[:, :k].sum(1), (~io["nbr_mask"]).sum(1))


def test_float32_import_matches():
  """The same weights imported in float32 (the checkpoint format training writes)."""
  model_in = imported(np.float32)
  model = E2Former(model_in.config)
  apply = jax.jit(lambda graph: model.apply(model_in.params, graph).energy[0])
  for s in STRUCTURES:
    energy = float(apply(our_graph(s, np.float32)))
    assert relative_error(energy, structure(s)["energy"]) <= FLOAT32_TOLERANCE, s


def test_per_edge_message_path_reproduces_their_energy(x64):
  """The materialised per-edge message (the test oracle) with the authors' sink, on s4's masked slots."""
  model_in = imported(np.float64)
  model = E2Former(model_in.config.replace(message_path=MessagePath.PER_EDGE))
  energy = jax.jit(lambda graph: model.apply(model_in.params, graph).energy[0])
  assert relative_error(float(energy(our_graph(4, np.float64))), structure(4)["energy"]) \
      <= RELATIVE_TOLERANCE


def test_pallas_kernels_reproduce_their_energy():
  """The imported model on the Pallas kernels (interpret mode): the sink logit from the edge_dot
  kernel through the fused forward. s4 has 71 masked slots that hold atoms beyond the cutoff.
  (The kernels' derivatives with a sink logit are tested in tests/pallas_kernels.)"""
  model_in = imported(np.float32)
  graph = our_graph(4, np.float32)
  kernels = E2Former(model_in.config.replace(attention_impl=AttentionImpl.PALLAS_INTERPRET))
  energy = jax.jit(lambda model, graph: model.apply(model_in.params, graph).energy[0],
                   static_argnums=0)
  assert relative_error(float(energy(kernels, graph)), structure(4)["energy"]) <= FLOAT32_TOLERANCE


def test_unknown_element_is_refused():
  model_in = imported(np.float32)
  predictor = Predictor(model=E2Former(model_in.config), params=model_in.params)
  assert model_in.config.num_species == 119
  with pytest.raises(ValueError, match="atomic number 119 is outside the model's range 1..118"):
    predictor.check_species(np.array([6, 119]))


def test_paper_manifest_maps_onto_paper_config():
  """Their paper-size model: every key placed, the config is paper_config(), and the parameter
  count is theirs minus the dead tensors and the table rows we do not index."""
  manifest = json.loads((REFERENCE_PARITY / "paper_manifest.json").read_text())
  entries = {e["key"]: e for e in manifest["entries"]}
  plan = plan_import({key: tuple(e["shape"]) for key, e in entries.items()},
                     reference_config=manifest["config"])
  assert plan.config == paper_config(**REFERENCE_NUMERICS)
  report = plan.report
  trainable = {key for key, e in entries.items() if e["trainable"]}
  assert trainable == set(report.mapped) | set(report.dead)
  assert set(entries) == set(report.mapped) | set(report.dead) | set(report.checked_constants) \
      | set(report.unused_constants)

  def size(key, rows=None):
    shape = entries[key]["shape"]
    return int(np.prod([shape[0] if rows is None else rows, *shape[1:]]))

  dead = sum(size(key) for key in report.dead)
  dropped_rows = sum(size(key) - size(key, kept) for key, (kept, _) in report.truncated.items())
  graph = authors_graph(structure(0), num_nodes=16, num_molecules=2, max_neighbors=32,
                        dtype=np.float32)
  shapes = jax.eval_shape(E2Former(plan.config).init, jax.random.key(0), graph)
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  assert manifest["params_trainable"] == 24_549_377
  assert ours == manifest["params_trainable"] - dead - dropped_rows


# ------------------------------------------------------------------------------ importer errors


@functools.cache
def state_dict():
  return dict(np.load(REFERENCE_PARITY / "tiny_state_dict.npz"))


def test_wrong_shape_names_key_and_shapes():
  key = "decoder.decoder.blocks.1.ga.proj_value.weight"
  state = state_dict() | {key: np.zeros((3, 16, 15))}
  with pytest.raises(ValueError, match=rf"key '{key}' has shape \(3, 16, 15\), expected \(3, 16, 16\)"):
    import_state_dict(state, reference_config=reference_config())


def test_missing_and_unknown_keys():
  key = "decoder.decoder.blocks.0.ffn.gate.gates.bias"
  state = {k: v for k, v in state_dict().items() if k != key}
  with pytest.raises(ValueError, match=rf"missing key '{key}' \(expected shape \(48,\)\)"):
    import_state_dict(state)
  state = state_dict() | {"decoder.decoder.blocks.0.ga.cluster_proj.weight": np.zeros((4, 4))}
  with pytest.raises(ValueError, match=r"unknown key 'decoder.decoder.blocks.0.ga.cluster_proj"):
    import_state_dict(state)


def test_constants_and_config_are_checked():
  offsets = "decoder.decoder.rbf.offset"
  with pytest.raises(ValueError, match=f"constant '{offsets}' differs"):
    import_state_dict(state_dict() | {offsets: np.linspace(0.0, 6.0, 16)},
                      reference_config=reference_config())  # max_radius 4.5
  config = reference_config()["backbone_config"]
  with pytest.raises(ValueError, match=r"num_attn_heads=8 contradicts the checkpoint's shapes"):
    import_state_dict(state_dict(), reference_config=config | {"num_attn_heads": 8})
  with pytest.raises(ValueError, match=r"attn_type='so2-second-order': only"):
    import_state_dict(state_dict(), reference_config=config | {"attn_type": "so2-second-order"})


def test_cutoff_from_the_basis_and_the_default_k():
  """Without their config: the cutoff from the Gaussian offsets, K from their defaults (reported)."""
  report = import_state_dict(state_dict()).report
  assert report.config_sources["cutoff"].startswith("the last Gaussian offset")
  assert report.config_sources["max_neighbors"].startswith("the authors' default")
  listed = reference_config()["parameters"]
  assert sorted(report.dead) == sorted(listed["dead_trainable_no_gradient"])
  # Unused: the README's unused constants plus the tables of their Wigner route to T.
  wigner_route = {k for k in state_dict() if k.endswith(("Jd_list.0", "Jd_list.1", "Jd_list.2",
                                                         "selected_idx", "CG_weight"))}
  assert set(report.unused_constants) == set(listed["constants_not_used_in_forward"]) | wigner_route


def test_energy_head_choice():
  state = state_dict()
  extra = {k.replace(".omol25.", ".spice."): v for k, v in state.items() if k.startswith("head.")}
  with pytest.raises(ValueError, match=r"energy heads \['omol25', 'spice'\]; choose one"):
    import_state_dict(state | extra)
  report = import_state_dict(state | extra, head="spice").report
  assert report.energy_head == "spice"
  assert sorted(report.other_heads) == sorted(k for k in state if k.startswith("head."))
