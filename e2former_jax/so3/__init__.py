"""SO(3) toolkit in the e3nn conventions: row layout, spherical harmonics, Clebsch-Gordan, Wigner D,
and the first-order tensor product with a vector (EAAS).

Conventions (identical to e3nn / e3nn-jax): real basis with y as the polar axis; rows l^2..l^2+2l
hold m = -l..l, so the degree-1 rows are (x, y, z); component normalisation ||Y^l||^2 = 2l+1;
features are [..., (lmax+1)^2, C], channels last. Every table is generated (Racah formula, CG
recursions), cached per degree, and works for any lmax.
"""

from e2former_jax.so3.clebsch_gordan import clebsch_gordan
from e2former_jax.so3.clebsch_gordan import clebsch_gordan_wonorm
from e2former_jax.so3.eaas import FirstOrderPath
from e2former_jax.so3.eaas import aligned_parity_table
from e2former_jax.so3.eaas import first_order_coupling
from e2former_jax.so3.eaas import first_order_paths
from e2former_jax.so3.eaas import global_sparse_cg
from e2former_jax.so3.eaas import num_first_order_rows
from e2former_jax.so3.eaas import tensor_product_vector
from e2former_jax.so3.eaas import tensor_product_vector_aligned
from e2former_jax.so3.eaas import tensor_product_vector_dense
from e2former_jax.so3.layout import degree_slice
from e2former_jax.so3.layout import lmax_from_rows
from e2former_jax.so3.layout import num_rows
from e2former_jax.so3.layout import row_degrees
from e2former_jax.so3.layout import row_index
from e2former_jax.so3.layout import row_orders
from e2former_jax.so3.safe import safe_norm
from e2former_jax.so3.spherical_harmonics import spherical_harmonics
from e2former_jax.so3.wigner import rotation_matrix_from_angles
from e2former_jax.so3.wigner import wigner_d
from e2former_jax.so3.wigner import wigner_d_block_diag
from e2former_jax.so3.wigner import wigner_d_from_angles

__all__ = [
    "FirstOrderPath",
    "aligned_parity_table",
    "clebsch_gordan",
    "clebsch_gordan_wonorm",
    "degree_slice",
    "first_order_coupling",
    "first_order_paths",
    "global_sparse_cg",
    "lmax_from_rows",
    "num_first_order_rows",
    "num_rows",
    "rotation_matrix_from_angles",
    "row_degrees",
    "row_index",
    "row_orders",
    "safe_norm",
    "spherical_harmonics",
    "tensor_product_vector",
    "tensor_product_vector_aligned",
    "tensor_product_vector_dense",
    "wigner_d",
    "wigner_d_block_diag",
    "wigner_d_from_angles",
]
