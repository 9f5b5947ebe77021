"""Internal coordinates of alanine dipeptide on real OpenMM frames: Z-matrix, exact round trips,
the log-det against autograd, the flow layer, and a short maximum-likelihood training."""

import math

import mdtraj
import openmm.app as app
import pytest
import torch

from openflow.data import load
from openflow.flows.base import BoltzmannGenerator, SequentialFlow
from openflow.flows.coupling import real_nvp
from openflow.flows.internal import (
    InternalCoordinates,
    InternalCoordinatesFlow,
    largest_gap_centre,
    zmatrix_from_topology,
)
from openflow.flows.priors import StandardNormal
from openflow.losses import nll
from openflow.plugins.openmm.md import simulate
from openflow.systems import alanine_dipeptide
from openflow.systems.alanine_dipeptide import pdb_path
from openflow.training import Trainer

N_ATOMS = 22


@pytest.fixture(scope="module")
def md(tmp_path_factory):
    """3000 frames of 300 K vacuum MD (Reference platform, 1 fs steps, a frame every 20 fs)."""
    system = alanine_dipeptide()
    out = tmp_path_factory.mktemp("ala2")
    result = simulate(
        system,
        steps=60_000,
        interval=20,
        out=out,
        seed=7,
        platform="Reference",
        equilibration_steps=2_000,
        progress=False,
    )
    x = load(result.trajectory, result.topology, system=system, dtype=torch.float64)
    return system, x, mdtraj.load(str(result.trajectory), top=str(result.topology))


@pytest.fixture(scope="module")
def zmatrix():
    return zmatrix_from_topology(alanine_dipeptide().topology)


def circular_difference(a, b):
    return torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi


def rotation(omega):
    """``exp([omega]_x)``, a rotation matrix differentiable in ``omega (3,)``."""
    zero = omega.new_zeros(())
    skew = torch.stack(
        [
            torch.stack([zero, -omega[2], omega[1]]),
            torch.stack([omega[2], zero, -omega[0]]),
            torch.stack([-omega[1], omega[0], zero]),
        ]
    )
    return torch.linalg.matrix_exp(skew)


def rigid_log_det(to_positions, u):
    """``log|det|`` of ``(u, T, omega) -> T + R(omega) to_positions(u)`` at ``T = omega = 0`` by
    autograd: the Jacobian of Cartesian positions with respect to internal plus rigid-body
    coordinates (the exponential map's Haar density is 1 at the identity)."""

    def full(v):
        pos = to_positions(v[:-6].unsqueeze(0)).reshape(N_ATOMS, 3)
        return (pos @ rotation(v[-3:]).T + v[-6:-3]).reshape(-1)

    v = torch.cat([u, u.new_zeros(6)])
    return torch.linalg.slogdet(torch.autograd.functional.jacobian(full, v))[1]


def test_zmatrix_places_every_atom_once_from_bonded_neighbours(zmatrix):
    topology = app.PDBFile(pdb_path()).topology
    bonded = {frozenset((b[0].index, b[1].index)) for b in topology.bonds()}
    order = list(zmatrix.anchors) + zmatrix.rows[:, 0].tolist()
    assert sorted(order) == list(range(N_ATOMS))
    assert zmatrix.dim == 3 * N_ATOMS - 6 and zmatrix.rows.shape == (N_ATOMS - 3, 4)
    a0, a1, a2 = zmatrix.anchors
    assert frozenset((a0, a1)) in bonded and frozenset((a1, a2)) in bonded
    position = {atom: p for p, atom in enumerate(order)}
    for i, j, k, l in zmatrix.rows.tolist():
        assert max(position[j], position[k], position[l]) < position[i]
        assert frozenset((i, j)) in bonded and frozenset((j, k)) in bonded
        assert frozenset((k, l)) in bonded or frozenset((j, l)) in bonded
    hydrogen = [a.element.symbol == "H" for a in topology.atoms()]
    first_hydrogen = min(p for p, atom in enumerate(order) if hydrogen[atom])
    assert all(hydrogen[atom] for atom in order[first_hydrogen:]), "heavy atoms must come first"
    names = zmatrix.describe()
    assert "ALA2-C  ALA2-CA  ALA2-N  ACE1-C" in names and "NME3-N  ALA2-C  ALA2-CA  ALA2-N" in names
    # the same from mdtraj's topology; a heavy-atom-only molecule works too
    mdtraj_topology = mdtraj.Topology.from_openmm(topology)
    assert (zmatrix_from_topology(mdtraj_topology).rows == zmatrix.rows).all()
    heavy = zmatrix_from_topology(mdtraj_topology.subset(mdtraj_topology.select("not element H")))
    assert heavy.dim == 24 and [heavy.atom_names[a] for a in heavy.anchors] == ["ALA2-CA", "ALA2-N", "ACE1-C"]
    # every level only depends on earlier levels
    done = set(zmatrix.anchors)
    for level in zmatrix.levels():
        assert set(zmatrix.rows[level, 1:].ravel()) <= done
        done |= set(zmatrix.rows[level, 0].tolist())
    assert done == set(range(N_ATOMS))


def test_zmatrix_rejects_bad_input(zmatrix):
    topology = app.Topology()
    residue = topology.addResidue("MOL", topology.addChain())
    atoms = [topology.addAtom(f"C{i}", app.Element.getBySymbol("C"), residue) for i in range(5)]
    for a, b in ((0, 1), (1, 2), (2, 3)):
        topology.addBond(atoms[a], atoms[b])
    with pytest.raises(ValueError, match="disconnected"):
        zmatrix_from_topology(topology)
    topology.addBond(atoms[3], atoms[4])
    assert len(zmatrix_from_topology(topology).rows) == 2
    with pytest.raises(ValueError, match="bonded chain"):
        zmatrix_from_topology(topology, anchors=(0, 2, 3))
    with pytest.raises(TypeError):
        zmatrix_from_topology("not a topology")
    with pytest.raises(ValueError, match=r"\(B, 66\)"):
        InternalCoordinates(zmatrix).to_internal(torch.zeros(4, 60, dtype=torch.float64))


def test_round_trips_on_md_frames(md, zmatrix):
    _, x, _ = md
    ic = InternalCoordinates(zmatrix)
    bonds, angles, torsions = ic.to_internal(x)
    assert bonds.shape == (len(x), 21) and angles.shape == (len(x), 20) and torsions.shape == (len(x), 19)
    back = ic.to_cartesian(bonds, angles, torsions)
    # canonical frame: exactly the input moved rigidly; compare also without that helper via all distances
    assert (back - ic.canonical_frame(x)).abs().max() < 1e-5
    distances = lambda y: torch.cdist(y.reshape(-1, N_ATOMS, 3), y.reshape(-1, N_ATOMS, 3))
    assert (distances(back) - distances(x)).abs().max() < 1e-5
    canonical = back.reshape(-1, N_ATOMS, 3)
    a0, a1, a2 = zmatrix.anchors
    assert canonical[:, a0].abs().max() == 0 and canonical[:, a1, 1:].abs().max() == 0
    assert canonical[:, a2, 2].abs().max() == 0 and (canonical[:, a2, 1] > 0).all()
    # internal -> Cartesian -> internal
    again = ic.to_internal(back)
    assert (again[0] - bonds).abs().max() < 1e-6 and (again[1] - angles).abs().max() < 1e-6
    assert circular_difference(again[2], torsions).abs().max() < 1e-6


def test_torsions_match_mdtraj_phi_psi(md, zmatrix):
    _, x, traj = md
    torsions = InternalCoordinates(zmatrix).to_internal(x)[2]
    names = zmatrix.describe()
    phi = torsions[:, names.index("ALA2-C  ALA2-CA  ALA2-N  ACE1-C")]
    psi = torsions[:, names.index("NME3-N  ALA2-C  ALA2-CA  ALA2-N")]
    reference_phi = torch.as_tensor(mdtraj.compute_phi(traj)[1][:, 0], dtype=torch.float64)
    reference_psi = torch.as_tensor(mdtraj.compute_psi(traj)[1][:, 0], dtype=torch.float64)
    assert circular_difference(phi, reference_phi).abs().max() < 1e-4  # DCD stores float32
    assert circular_difference(psi, reference_psi).abs().max() < 1e-4


def test_log_det_matches_autograd_on_md_frames(md, zmatrix):
    _, x, _ = md
    ic = InternalCoordinates(zmatrix)
    a0, a1, a2 = zmatrix.anchors
    # the 3n - 6 free canonical-frame coordinates: a1's x, a2's x and y, every coordinate of the rest
    free = torch.ones(N_ATOMS, 3, dtype=torch.bool)
    free[a0] = False
    free[a1, 1:] = False
    free[a2, 2] = False
    free = free.reshape(-1)
    sizes = (N_ATOMS - 1, N_ATOMS - 2, N_ATOMS - 3)
    to_positions = lambda u: ic.to_cartesian(*u.split(sizes, 1))
    for frame in x[:: len(x) // 3][:3]:
        bonds, angles, torsions = ic.to_internal(frame.unsqueeze(0))
        u = torch.cat([bonds, angles, torsions], 1)[0]
        jacobian = torch.autograd.functional.jacobian(lambda v: to_positions(v.unsqueeze(0))[0, free], u)
        reduced = ic.log_det_jacobian(bonds, angles, rigid_body=False)
        assert torch.linalg.slogdet(jacobian)[1] == pytest.approx(reduced.item(), abs=1e-6)
        full = ic.log_det_jacobian(bonds, angles)
        assert rigid_log_det(to_positions, u).item() == pytest.approx(full.item(), abs=1e-6)
        # the closed form: every bond 2 log b, every angle log sin
        assert full.item() == pytest.approx((2 * bonds.log().sum() + angles.sin().log().sum()).item(), abs=1e-12)


def test_flow_layer_is_exact_bijection_with_autograd_log_det(md, zmatrix):
    _, x, _ = md
    flow = InternalCoordinatesFlow(zmatrix).double().fit(x)
    z, logdet_inverse = flow.inverse(x)
    assert z.shape == (len(x), 60) and torch.isfinite(z).all()
    assert z.mean(0).abs().max() < 1e-8 and (z.std(0) - 1).abs().max() < 1e-8  # standardised
    back, logdet_forward = flow(z)
    assert (back - flow.transform.canonical_frame(x)).abs().max() < 1e-5
    assert (logdet_forward + logdet_inverse).abs().max() < 1e-8
    z_again, _ = flow.inverse(back)
    assert (z_again - z).abs().max() < 1e-6
    generator = torch.Generator().manual_seed(0)
    z_new = torch.randn(2, 60, generator=generator, dtype=torch.float64)
    x_new, logdet_new = flow(z_new)
    for zi, ld in zip(torch.cat([z[:1], z_new]), torch.cat([logdet_forward[:1], logdet_new])):
        assert rigid_log_det(lambda u: flow(u)[0], zi).item() == pytest.approx(ld.item(), abs=1e-6)
    assert (flow.inverse(x_new)[0] - z_new).abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"\(B, 60\)"):
        flow(torch.zeros(3, 66, dtype=torch.float64))


def test_torsion_cut_lies_in_the_widest_gap():
    generator = torch.Generator().manual_seed(1)
    noise = lambda scale: scale * torch.randn(2000, generator=generator, dtype=torch.float64)
    uniform = 0.5 + 2.0 * torch.rand(2000, generator=generator, dtype=torch.float64)  # on [0.5, 2.5]
    straddle = circular_difference(math.pi + noise(0.4), torch.tensor(0.0))  # a mode at +-pi
    bimodal = torch.where(torch.rand(2000, generator=generator) < 0.5, -2.0, 1.0) + noise(0.3)
    cut = largest_gap_centre(torch.stack([uniform, straddle, bimodal], 1))
    assert abs(circular_difference(cut[0], torch.tensor(1.5))) > 2.5
    assert abs(cut[1]) < 0.5
    assert min(abs(circular_difference(cut[2], torch.tensor(mode))) for mode in (-2.0, 1.0)) > 1.2
    flow = InternalCoordinatesFlow(zmatrix_from_topology(alanine_dipeptide().topology))
    with pytest.raises(ValueError, match="at least 2"):
        flow.fit(torch.zeros(1, 66))


def test_short_maximum_likelihood_training_lowers_held_out_nll(md, zmatrix):
    _, x, _ = md
    x = x.float()
    train, test = x[:2400], x[2400:]  # held out: the last 12 ps of the run
    torch.manual_seed(0)
    flow = SequentialFlow(real_nvp(60, n_layers=4, hidden=(64, 64)), InternalCoordinatesFlow(zmatrix).fit(train))
    model = BoltzmannGenerator(StandardNormal(60), flow)
    with torch.no_grad():
        model.train()
        model.log_prob(train)  # ActNorm data initialisation on the training set
        model.eval()
        before_train, before_test = nll(model, train).item(), nll(model, test).item()
    Trainer(model, nll, train, batch_size=256, lr=1e-3, device="cpu", seed=0, progress=False).fit(60)
    model.eval()
    with torch.no_grad():
        after_train, after_test = nll(model, train).item(), nll(model, test).item()
    assert math.isfinite(before_test) and math.isfinite(after_test)
    assert after_train < before_train - 1.0
    assert after_test < before_test - 0.5
    # samples: Cartesian positions in the canonical frame whose log q the model reproduces
    with torch.no_grad():
        samples, log_q = model.sample(64)
        assert samples.shape == (64, 66) and torch.isfinite(log_q).all()
        assert (model.log_prob(samples) - log_q).abs().max() < 1e-2


def test_circular_torsions_pass_through_as_plain_angles(md, zmatrix):
    """phi and psi kept as angles: the flow's z holds exactly mdtraj's phi/psi there, unstandardised,
    and the layer stays an exact bijection with the autograd log-det."""
    _, x, traj = md
    phi_atoms, psi_atoms = mdtraj.compute_phi(traj)[0][0], mdtraj.compute_psi(traj)[0][0]
    torsions = [zmatrix.torsion_index(phi_atoms), zmatrix.torsion_index(psi_atoms[::-1])]
    flow = InternalCoordinatesFlow(zmatrix, circular_torsions=torsions).double().fit(x)
    assert flow.circular_dims == [2 * N_ATOMS - 3 + t for t in sorted(torsions)]
    z, logdet_inverse = flow.inverse(x)
    columns = [flow.circular_dims[sorted(torsions).index(t)] for t in torsions]
    for column, compute in zip(columns, (mdtraj.compute_phi, mdtraj.compute_psi)):
        reference = torch.as_tensor(compute(traj)[1][:, 0], dtype=torch.float64)
        assert circular_difference(z[:, column], reference).abs().max() < 1e-4
        assert z[:, column].min() >= -math.pi and z[:, column].max() < math.pi
    others = [c for c in range(60) if c not in columns]
    assert z[:, others].mean(0).abs().max() < 1e-8 and (z[:, others].std(0) - 1).abs().max() < 1e-8
    back, logdet_forward = flow(z)
    assert (back - flow.transform.canonical_frame(x)).abs().max() < 1e-5
    assert (logdet_forward + logdet_inverse).abs().max() < 1e-8
    assert rigid_log_det(lambda u: flow(u)[0], z[0]).item() == pytest.approx(logdet_forward[0].item(), abs=1e-6)
    # an angle given outside [-pi, pi) is the same configuration
    turned = z[:5].clone()
    turned[:, columns[0]] += 2 * math.pi
    assert (flow(turned)[0] - back[:5]).abs().max() < 1e-9
    with pytest.raises(ValueError, match="no Z-matrix row"):
        zmatrix.torsion_index([0, 1, 2, 3])
    with pytest.raises(ValueError, match="circular_torsions"):
        InternalCoordinatesFlow(zmatrix, circular_torsions=[19])
