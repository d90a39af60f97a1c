"""Dataset readers (SPICE HDF5, MACE-OFF extxyz, OMol25 ASE LMDB), splits, reference energies and
the padded, prefetched batch iterator of the training loop."""

from train.data.batch import Batch, collate
from train.data.extxyz import ExtXYZDataset
from train.data.formats import open_dataset
from train.data.iterator import BatchIterator, DataPosition
from train.data.omol25 import OMol25Dataset
from train.data.packing import pack
from train.data.records import Dataset, InvalidRecordError, Record, validate_record
from train.data.reference_energies import ReferenceEnergies, fit_on_dataset, fit_reference_energies
from train.data.spice import SpiceHDF5Dataset
from train.data.splits import split_by_molecule
