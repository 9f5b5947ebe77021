"""Flows: one protocol (``base.Flow``), couplings, canonical transformations, continuous flows, priors."""

from .base import BoltzmannGenerator, Flow, InverseFlow, SequentialFlow, SubsetFlow
from .circular import CircularSplineCoupling, GaussianToCircle, circular_flow
from .cnf import ContinuousFlow, MLPPotential, MLPVelocity, MongeAmpereFlow, SymmetricPotential
from .coupling import ActNorm, AffineCoupling, real_nvp
from .internal import InternalCoordinates, InternalCoordinatesFlow, ZMatrix, zmatrix_from_topology
from .linear import LinearExp
from .priors import IsotropicNormal, LatentHarmonicPrior, StandardNormal, moment_matched_normal
from .spline import SplineCoupling, rational_quadratic_spline, spline_flow
from .symplectic import (
    CanonicalSequential,
    HamiltonianFlow,
    LinearSymplectic,
    NeuralCanonicalTransformation,
    PointTransformation,
    SymplecticScaling,
)

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "BoltzmannGenerator",
    "CanonicalSequential",
    "CircularSplineCoupling",
    "ContinuousFlow",
    "Flow",
    "GaussianToCircle",
    "SubsetFlow",
    "circular_flow",
    "HamiltonianFlow",
    "InternalCoordinates",
    "IsotropicNormal",
    "InternalCoordinatesFlow",
    "InverseFlow",
    "LatentHarmonicPrior",
    "LinearExp",
    "LinearSymplectic",
    "MLPPotential",
    "MLPVelocity",
    "MongeAmpereFlow",
    "NeuralCanonicalTransformation",
    "PointTransformation",
    "SequentialFlow",
    "SplineCoupling",
    "StandardNormal",
    "SymmetricPotential",
    "SymplecticScaling",
    "ZMatrix",
    "moment_matched_normal",
    "rational_quadratic_spline",
    "real_nvp",
    "spline_flow",
    "zmatrix_from_topology",
]
