"""sj-parallel-conversion: parallel ANN-SNN conversion for SpikingJelly 2.x.

Implements Hao, Yu & Huang, "Faster and Stronger: When ANN-SNN Conversion Meets Parallel Spiking
Calculation" (ICML 2025). Public API:

Neuron and activations
    :class:`ParallelConversionNode`  SpikingJelly neuron computing all T steps at once.
    :class:`QCFS`, :class:`ClipReLU`, :class:`DAQCFS`  the ANN-side activations.
"""
from .activation import DAQCFS, QCFS, ClipReLU
from .neuron import ParallelConversionNode

__version__ = "0.1.0"

__all__ = ["ParallelConversionNode", "QCFS", "ClipReLU", "DAQCFS"]
