"""Trainer: exact resume, skipped non-finite steps, checkpoints and metrics files, schedules,
energy-based training to a known free energy, and a 2D toy trained to its exact likelihood."""

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from openflow.flows.base import BoltzmannGenerator
from openflow.flows.coupling import ActNorm, real_nvp
from openflow.flows.priors import StandardNormal
from openflow.losses import nll, reverse_kl
from openflow.training import CHECKPOINT_KEYS, Trainer, load_checkpoint, resolve_device, set_seed

BANANA_NOISE = 0.3


def banana(n, seed):
    """x1 ~ N(0, 1), x2 = (x1^2 - 1)/2 + 0.3 eps: entropy log(2 pi e) + log 0.3 exactly."""
    gen = torch.Generator().manual_seed(seed)
    x1, eps = torch.randn(2, n, generator=gen)
    return torch.stack([x1, 0.5 * (x1**2 - 1) + BANANA_NOISE * eps], dim=1)


BANANA_ENTROPY = math.log(2 * math.pi * math.e) + math.log(BANANA_NOISE)


def small_flow_model(seed, n_layers=2, hidden=(16,)):
    torch.manual_seed(seed)
    return BoltzmannGenerator(StandardNormal(2), real_nvp(2, n_layers=n_layers, hidden=hidden))


def gaussian_energy(x):
    """Target N((1, -2), diag(0.5^2, 2^2)) in kT; free energy -log(2 pi * 0.5 * 2) = -log(2 pi)."""
    mu = torch.tensor([1.0, -2.0], dtype=x.dtype)
    sigma = torch.tensor([0.5, 2.0], dtype=x.dtype)
    return 0.5 * ((x - mu) / sigma).pow(2).sum(dim=1)


def diagonal_gaussian_model():
    return BoltzmannGenerator(StandardNormal(2), ActNorm(2, data_init=False))


def nll_loss(model, batch):
    return nll(model, batch)


def energy_loss(model, batch):
    assert batch is None
    return reverse_kl(model, gaussian_energy, 64)


def loader_loss(model, batch):
    return nll(model, batch[0])


def make_run(kind, out_dir, model_seed, **kwargs):
    """A tiny trainer of each data kind: tensor data, a shuffling DataLoader, or energy-based."""
    data = banana(512, seed=0)
    if kind == "tensor":
        return Trainer(small_flow_model(model_seed), nll_loss, data, batch_size=64, out_dir=out_dir, **kwargs)
    if kind == "loader":
        loader = DataLoader(TensorDataset(data), batch_size=100, shuffle=True)  # 5 full batches + 1 partial
        return Trainer(small_flow_model(model_seed), loader_loss, loader, out_dir=out_dir, **kwargs)
    torch.manual_seed(model_seed)
    return Trainer(small_flow_model(model_seed), energy_loss, None, out_dir=out_dir, **kwargs)


class Crash(Exception):
    pass


def crashing(loss_fn, at_call):
    calls = []

    def wrapped(model, batch):
        calls.append(1)
        if len(calls) == at_call:
            raise Crash
        return loss_fn(model, batch)

    return wrapped


@pytest.mark.parametrize("kind", ["tensor", "loader", "energy"])
def test_resumed_run_reproduces_the_uninterrupted_one_exactly(tmp_path, kind):
    settings = dict(
        lr=3e-3,
        schedule="cosine",
        total_steps=20,
        grad_clip=5.0,
        seed=11,
        checkpoint_every=5,
        device="cpu",
        progress=False,
        config={"kind": kind},
    )
    reference = make_run(kind, tmp_path / "a", model_seed=1, **settings)
    reference_history = reference.fit(20)
    losses = [r["loss"] for r in reference_history]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)

    # an interrupted run: crashes during step 13, after the checkpoint at step 10
    interrupted = make_run(kind, tmp_path / "b", model_seed=1, **settings)
    interrupted.loss_fn = crashing(interrupted.loss_fn, at_call=13)
    with pytest.raises(Crash):
        interrupted.fit(20)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 10
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 13))

    # a fresh process: other weights, other global RNG states, then resume from the checkpoint
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    resumed = make_run(kind, tmp_path / "b", model_seed=2, **settings)
    history = resumed.fit(20, resume=True)
    assert [r["step"] for r in history] == list(range(1, 21))
    assert [r["loss"] for r in history] == losses
    assert [r["lr"] for r in history] == [r["lr"] for r in reference_history]
    for p, q in zip(resumed.model.parameters(), reference.model.parameters()):
        assert torch.equal(p, q)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == losses
    # the global RNGs continue as in the uninterrupted run
    after_resumed = (random.random(), np.random.rand(), torch.rand(1).item())
    reference.fit(20, resume=True)  # already at step 20: reloads its own final checkpoint only
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == after_resumed


def test_resume_ignores_a_checkpoint_of_another_config(tmp_path, capsys):
    """A rerun with changed settings must not continue from the old run's weights, and says why in one line."""
    settings = dict(lr=3e-3, seed=11, checkpoint_every=5, device="cpu", progress=False)
    make_run("tensor", tmp_path, model_seed=1, config={"layers": 2}, **settings).fit(10)
    changed = make_run("tensor", tmp_path, model_seed=2, config={"layers": 3}, **settings)
    start = [p.detach().clone() for p in changed.model.parameters()]
    capsys.readouterr()
    history = changed.fit(3, resume=True)
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "training from the start" in message[0] and "layers: 2 -> 3" in message[0]
    assert changed.step == 3 and [r["step"] for r in history] == [1, 2, 3]
    assert any(not torch.equal(p, q) for p, q in zip(changed.model.parameters(), start))
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["run"] == {"layers": 3}
    same = make_run("tensor", tmp_path, model_seed=3, config={"layers": 3}, **settings)
    same.fit(3, resume=True)  # the same config: resumed at step 3, nothing left to do
    assert all(torch.equal(p, q) for p, q in zip(same.model.parameters(), changed.model.parameters()))


def test_nonfinite_losses_and_gradients_skip_the_step(tmp_path):
    data = banana(256, seed=1)
    snapshots = []

    def loss_fn(model, batch):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        call = len(snapshots)
        loss = nll(model, batch)
        if call == 2:
            return loss * math.nan
        if call == 4:  # finite loss (0) with a NaN gradient: d sqrt(s)/ds at 0 times 0
            weight = next(model.parameters())
            return loss + torch.sqrt(((weight - weight.detach()) ** 2).sum())
        return loss

    trainer = Trainer(small_flow_model(3), loss_fn, data, batch_size=64, device="cpu", progress=False, out_dir=tmp_path)
    history = trainer.fit(6)
    assert trainer.n_skipped == 2
    assert [r["skipped"] for r in history] == [False, True, False, True, False, False]
    assert history[1]["loss"] is None and history[1]["grad_norm"] is None
    assert math.isfinite(history[3]["loss"]) and history[3]["grad_norm"] is None
    assert [r["n_skipped"] for r in history] == [0, 1, 1, 2, 2, 2]
    for skipped_call in (2, 4):  # parameters seen after a skipped step == before it
        for before, after in zip(snapshots[skipped_call - 1], snapshots[skipped_call]):
            assert torch.equal(before, after)
    assert any(not torch.equal(b, a) for b, a in zip(snapshots[2], snapshots[3]))
    adam_steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {4}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == history


def test_checkpoint_is_atomic_and_complete(tmp_path):
    trainer = Trainer(
        small_flow_model(4),
        nll_loss,
        banana(256, seed=2),
        batch_size=64,
        device="cpu",
        progress=False,
        out_dir=tmp_path,
        checkpoint_every=3,
        schedule="step",
        step_size=2,
        config={"model": "real_nvp", "n_layers": 2},
    )
    trainer.fit(4)
    path = tmp_path / "checkpoint.pt"
    assert path.exists() and not (tmp_path / "checkpoint.pt.tmp").exists()
    state = load_checkpoint(path)  # weights_only: plain tensors, numbers and strings
    assert set(CHECKPOINT_KEYS) <= set(state)
    assert state["step"] == 4 and state["n_skipped"] == 0
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}
    assert state["data"]["cursor"] == 4 * 64 and state["data"]["epoch_rng"] is not None
    assert state["config"]["run"] == {"model": "real_nvp", "n_layers": 2}
    assert state["config"]["trainer"]["schedule"] == "step" and state["scheduler"]["last_epoch"] == 4
    fresh = small_flow_model(5)
    fresh.load_state_dict(state["model"])
    x = banana(10, seed=3)
    trainer.model.eval(), fresh.eval()
    torch.testing.assert_close(fresh.log_prob(x), trainer.model.log_prob(x), atol=0, rtol=0)

    # a failed write (at step 6) leaves the previous checkpoint intact: the new one goes to .tmp first
    (tmp_path / "checkpoint.pt.tmp").mkdir()
    with pytest.raises(OSError):
        trainer.fit(6)
    assert trainer.step == 6
    assert load_checkpoint(path)["step"] == 4


def test_metrics_and_energy_based_training_reach_the_free_energy(tmp_path):
    """Reverse KL without data on a diagonal Gaussian target: the exact free energy is -log(2 pi)."""
    trainer = Trainer(
        diagonal_gaussian_model(),
        energy_loss,
        None,
        lr=0.05,
        device="cpu",
        seed=5,
        progress=False,
        out_dir=tmp_path,
        log_every=10,
    )
    history = trainer.fit(400)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == history and [r["step"] for r in records] == list(range(10, 401, 10))
    for key in ("loss", "lr", "grad_norm", "skipped", "free_energy_kT", "free_energy_stderr_kT", "n_nonfinite"):
        assert key in records[-1]
    flow = trainer.model.flow
    torch.testing.assert_close(flow.shift.detach(), torch.tensor([1.0, -2.0]), atol=0.1, rtol=0)
    torch.testing.assert_close(flow.log_scale.detach().exp(), torch.tensor([0.5, 2.0]), atol=0, rtol=0.05)
    torch.manual_seed(0)
    _, stats = reverse_kl(trainer.model, gaussian_energy, 20_000)
    assert -math.log(2 * math.pi) <= stats["free_energy_kT"] + 3 * stats["free_energy_stderr_kT"]
    assert stats["free_energy_kT"] == pytest.approx(-math.log(2 * math.pi), abs=0.01)


def test_two_dimensional_toy_reaches_the_exact_likelihood():
    """RealNVP on the banana (exactly representable by one coupling): held-out NLL -> entropy."""
    model = small_flow_model(6, n_layers=3, hidden=(32,))
    trainer = Trainer(
        model,
        nll_loss,
        banana(20_000, seed=7),
        batch_size=256,
        lr=1e-2,
        schedule="cosine",
        total_steps=200,
        device="cpu",
        progress=False,
        seed=8,
    )
    trainer.fit(200)
    model.eval()
    test = banana(50_000, seed=9)
    with torch.no_grad():
        log_q = model.log_prob(test)
    held_out = -log_q.mean().item()
    stderr = log_q.std().item() / math.sqrt(len(test))
    assert held_out > BANANA_ENTROPY - 5 * stderr  # cross-entropy >= entropy
    assert held_out < BANANA_ENTROPY + 0.05


def test_schedules_follow_their_closed_forms():
    model = diagonal_gaussian_model()
    cosine = Trainer(
        model, energy_loss, None, lr=0.1, schedule="cosine", total_steps=8, min_lr=0.02, device="cpu", progress=False
    )
    lrs = [r["lr"] for r in cosine.fit(8)]
    expected = [0.02 + 0.08 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    step = Trainer(
        diagonal_gaussian_model(),
        energy_loss,
        None,
        lr=0.1,
        schedule="step",
        step_size=3,
        gamma=0.5,
        device="cpu",
        progress=False,
    )
    assert [r["lr"] for r in step.fit(7)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025])


def test_gradient_clipping_bounds_the_applied_gradient():
    trainer = Trainer(
        small_flow_model(7), nll_loss, banana(256, seed=4), batch_size=64, grad_clip=1e-3, device="cpu", progress=False
    )
    (record,) = trainer.fit(1)
    assert record["grad_norm"] > 1e-2
    applied = torch.sqrt(sum(p.grad.pow(2).sum() for p in trainer.params if p.grad is not None))
    assert applied.item() == pytest.approx(1e-3, rel=1e-4)


def test_fit_continues_to_the_total_step_count():
    trainer = Trainer(diagonal_gaussian_model(), energy_loss, None, device="cpu", progress=False)
    trainer.fit(3)
    history = trainer.fit(5)
    assert trainer.step == 5 and [r["step"] for r in history] == [1, 2, 3, 4, 5]


def test_trainer_rejects_bad_configuration(tmp_path):
    data = banana(100, seed=5)
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(small_flow_model(0), nll_loss, data, optimizer="sgd", device="cpu")
    with pytest.raises(ValueError, match="total_steps"):
        Trainer(small_flow_model(0), nll_loss, data, schedule="cosine", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(small_flow_model(0), nll_loss, data, batch_size=500, device="cpu")
    with pytest.raises(ValueError, match="lr"):
        Trainer(small_flow_model(0), nll_loss, data, lr=-1.0, device="cpu")
    with pytest.raises(TypeError, match="JSON"):
        Trainer(small_flow_model(0), nll_loss, data, config={"f": print}, device="cpu")
    with pytest.raises(TypeError, match="require grad"):
        Trainer(small_flow_model(0), lambda m, b: torch.tensor(1.0), data, batch_size=10, device="cpu").fit(1)
    with pytest.raises(ValueError, match="reserved"):
        Trainer(
            small_flow_model(0),
            lambda m, b: (nll(m, b), {"loss": 1.0}),
            data,
            batch_size=10,
            device="cpu",
            progress=False,
        ).fit(1)
    with pytest.raises(FileNotFoundError):
        Trainer(small_flow_model(0), nll_loss, data, batch_size=10, device="cpu", out_dir=tmp_path).resume()


def test_set_seed_and_resolve_device():
    set_seed(3)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_seed(3)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    with pytest.raises(ValueError):
        set_seed(-1)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("warp-drive")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no usable CUDA"):
            resolve_device("cuda")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert resolve_device("cuda").type == "cuda"


def test_lbfgs_reaches_the_exact_maximum_likelihood_of_a_full_batch(tmp_path):
    """Full-batch NLL of a diagonal Gaussian: the optimum is the sample mean and (biased) std."""
    torch.manual_seed(3)
    data = torch.randn(500, 3, dtype=torch.float64) * torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64) + 1.0

    class Gaussian(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mean = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
            self.log_std = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))

        def log_prob(self, x):
            return torch.distributions.Normal(self.mean, self.log_std.exp()).log_prob(x).sum(1)

    model = Gaussian()
    trainer = Trainer(
        model,
        lambda m, _: -m.log_prob(data).mean(),
        optimizer="lbfgs",
        lr=1.0,
        device="cpu",
        out_dir=tmp_path,
        progress=False,
    )
    trainer.fit(40)
    torch.testing.assert_close(model.mean.detach(), data.mean(0), rtol=0, atol=1e-8)
    torch.testing.assert_close(model.log_std.exp().detach(), data.std(0, unbiased=False), rtol=0, atol=1e-8)
    assert (tmp_path / "checkpoint.pt").exists()


def test_more_steps_continue_the_checkpoint_and_fewer_start_afresh(tmp_path, capsys):
    """Extending a finished run continues from its checkpoint (steps 11-15 only); asking for fewer steps
    than the checkpoint holds, or other trainer settings, retrains with a one-line reason."""
    settings = dict(lr=3e-3, seed=11, checkpoint_every=5, device="cpu", progress=False)
    make_run("tensor", tmp_path, model_seed=1, config={"layers": 2}, **settings).fit(10)
    longer = make_run("tensor", tmp_path, model_seed=2, config={"layers": 2}, **settings)
    history = longer.fit(15, resume=True)
    assert [r["step"] for r in history] == list(range(1, 16)) and longer.step == 15
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(
        range(1, 16)
    )
    capsys.readouterr()
    shorter = make_run("tensor", tmp_path, model_seed=2, config={"layers": 2}, **settings)
    assert [r["step"] for r in shorter.fit(4, resume=True)] == [1, 2, 3, 4]
    assert "holds 15 steps, more than the 4 asked for" in capsys.readouterr().err
    faster = make_run("tensor", tmp_path, model_seed=2, config={"layers": 2}, **dict(settings, lr=1e-2))
    faster.fit(6, resume=True)
    assert "trainer.lr: 0.003 -> 0.01" in capsys.readouterr().err and faster.step == 6


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", None])
def test_a_broken_checkpoint_is_one_clear_error(tmp_path, content):
    settings = dict(lr=3e-3, seed=11, checkpoint_every=5, device="cpu", progress=False)
    make_run("tensor", tmp_path, model_seed=1, config={"layers": 2}, **settings).fit(5)
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content if content is not None else path.read_bytes()[:200])  # None: truncated
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable checkpoint .*delete it"):
        make_run("tensor", tmp_path, model_seed=1, config={"layers": 2}, **settings).fit(10, resume=True)
