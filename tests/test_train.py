import copy
import math
import os
import pickle

import pytest
import torch

import pyro

from pyro_vae import VAE, elbo, fit, load_checkpoint, read_checkpoint, save_checkpoint
from pyro_vae.datasets import TensorDataset, load
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.train import Hook, TrainingDiverged, best_epoch


class KeepStates(Hook):
    """Keeps every checkpointed training state, as the dict a checkpoint file holds."""

    def __init__(self, states):
        self.states = states

    def on_checkpoint(self, state):
        self.states.append(state.to_dict())

from conftest import requires_cuda


def _digits():
    return load("digits")


def _params(vae):
    return {k: v.detach().clone() for k, v in vae.named_parameters()}


@pytest.mark.slow
def test_training_on_mnist_subset_raises_validation_elbo(mnist):
    train, valid, _ = mnist
    train, valid = train.subset(3000), valid.subset(1000)
    vae = VAE(784, z_dim=20, hidden=(200,))
    before = elbo(vae, valid, seed=0)
    history = fit(vae, train, valid, epochs=3, batch_size=100, lr=1e-3, progress=False)
    after = elbo(vae, valid, seed=0)
    # Untrained: about -545 nats (784 * log 2 is 543). Three epochs of 30 steps reach
    # about -200; demand a 150-nat rise, far beyond Monte Carlo noise (< 1 nat here).
    assert before < -500
    assert after > before + 150
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["valid_elbo"] > history[0]["valid_elbo"]
    assert history[-1]["valid_elbo"] == pytest.approx(after, abs=2.0)


def test_history_records_and_callbacks():
    train, valid, _ = _digits()
    seen = []
    history = fit(VAE(64, 4, (16,)), train, valid, epochs=2, progress=False,
                  hooks=[lambda record, history, vae: seen.append(dict(record))])
    assert seen == history
    assert set(history[0]) == {"epoch", "beta", "train_elbo", "valid_elbo", "seconds"}
    assert all(r["seconds"] > 0 and r["train_elbo"] < 0 for r in history)


def test_evaluation_never_moves_parameters():
    train, valid, _ = _digits()
    vae = VAE(64, 4, (16,))
    fit(vae, train, epochs=1, progress=False)
    before = _params(vae)
    a = elbo(vae, valid, loss="trace", seed=3)
    b = elbo(vae, valid, loss="trace", seed=3)
    assert a == b  # same seed, same draws
    assert all(torch.equal(before[k], v) for k, v in _params(vae).items())


def test_fit_trains_the_given_model_after_another_with_the_same_names():
    """PyroModule registers parameters by name in Pyro's global store. A stale entry
    from an earlier model of the same layout would be optimized in place of the new one."""
    train, _, _ = _digits()
    fit(VAE(64, 4, (16,)), train, epochs=1, progress=False)
    second = VAE(64, 4, (16,))
    before = _params(second)
    fit(second, train, epochs=1, progress=False)
    after = _params(second)
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_train_elbo_is_per_data_point():
    """The loss is scaled by N / B; the reported ELBO must undo it exactly once."""
    train, valid, _ = _digits()
    vae = VAE(64, 4, (16,))
    history = fit(vae, train, valid, epochs=1, lr=1e-12, progress=False)  # frozen
    # With the weights (almost) fixed, the running train ELBO and a fresh estimate of the
    # same quantity agree to Monte Carlo error (about 0.3 nats for 1297 points here).
    assert history[0]["train_elbo"] == pytest.approx(elbo(vae, train, seed=1), abs=1.5)


def test_bernoulli_on_gray_data_is_refused_with_one_line():
    train, _, _ = load("digits", binarize=False)
    with pytest.raises(ValueError) as e:
        fit(VAE(64, 4, (16,)), train, epochs=1, progress=False)
    msg = str(e.value)
    assert "likelihood 'bernoulli' needs x in {0, 1}" in msg and "'digits'" in msg
    assert "\n" not in msg


def test_divergence_is_reported():
    train, _, _ = _digits()
    vae = VAE(64, 4, (16,))
    with torch.no_grad():
        vae.decoder[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged,
                       match="non-finite parameter decoder.0.weight .* at epoch 1, step 1;"):
        fit(vae, train, epochs=1, progress=False)


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class _FaultAtStep(BernoulliLikelihood):
    """The Bernoulli head, except at training step ``at`` (counted over calls with
    gradients on, i.e. SVI steps): a NaN loss, or a NaN gradient with a finite loss.
    Records the model's parameters as they were just before that step."""

    def __init__(self, x_dim, at, gradient=False):
        super().__init__(x_dim)
        # -1: fit's one probe of the gradient (finding the trained parameters) is not a step
        self.at, self.gradient, self.calls = at, gradient, -1
        self.owner, self.before = [], None

    def forward(self, logits):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                self.before = {k: v.clone() for k, v in self.owner[0].state_dict().items()}
                logits = _NanGradient.apply(logits) if self.gradient else logits * float("nan")
        return super().forward(logits)


@pytest.mark.parametrize("gradient, quantity", [
    (False, r"non-finite loss \(loss nan\)"),
    (True, r"non-finite gradient of (encoder|decoder)\.\S+ \(loss -?[0-9.]+\)"),
])
def test_nonfinite_step_stops_training_and_changes_nothing(gradient, quantity):
    """A NaN loss, or a NaN gradient under a finite loss, injected at step 5 of epoch 2:
    fit stops naming epoch, step and quantity, and every parameter is bitwise what it was
    before that step (the update was not applied)."""
    train, _, _ = _digits()
    steps_per_epoch = -(-len(train) // 64)
    head = _FaultAtStep(64, at=steps_per_epoch + 5, gradient=gradient)
    vae = VAE(64, 4, (16,), likelihood=head)
    head.owner.append(vae)
    with pytest.raises(TrainingDiverged, match=quantity + " at epoch 2, step 5;"):
        fit(vae, train, epochs=3, batch_size=64, progress=False)
    after = vae.state_dict()
    assert head.before is not None and after.keys() == head.before.keys()
    assert all(torch.equal(after[k], v) for k, v in head.before.items())
    assert all(torch.isfinite(v).all() for v in after.values())


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_steps_skip_a_nonfinite_update_on_the_device(device, caplog):
    """Checked every 4 steps, a NaN gradient at step 3 is skipped by the fused Adam
    kernel itself (no wait for the device) and found at step 4: the run ends with the
    parameters and optimizer state of a run that checked every step."""
    train, _, _ = _digits()
    runs = []
    for check_every in (1, 4):
        head = _FaultAtStep(64, at=3, gradient=True)
        torch.manual_seed(0)
        vae = VAE(64, 4, (16,), likelihood=head)
        head.owner.append(vae)
        with caplog.at_level("WARNING", logger="pyro_vae"):
            history = fit(vae, train, epochs=2, batch_size=64, progress=False,
                          skip_nonfinite=1, device=device, check_every=check_every)
        runs.append((vae.cpu().state_dict(), history))
    (a, history_a), (b, history_b) = runs
    if device == "cpu":  # the same kernels: bitwise
        assert all(torch.equal(a[k], b[k]) for k in a)
    else:
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert [r["train_elbo"] for r in history_a] == pytest.approx(
        [r["train_elbo"] for r in history_b], rel=1e-6)
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert skipped[0].startswith("non-finite gradient of ")
    assert skipped[1] == ("non-finite loss or a gradient (steps are checked every 4; found "
                          "at step 4) at epoch 1, step 3: step skipped, no parameter changed "
                          "(1 of 1 allowed)")


def test_unchecked_nonfinite_step_stops_training_at_the_next_check():
    train, _, _ = _digits()
    head = _FaultAtStep(64, at=2)
    vae = VAE(64, 4, (16,), likelihood=head)
    head.owner.append(vae)
    saved = []
    with pytest.raises(TrainingDiverged, match=r"non-finite loss or a gradient \(steps are "
                       r"checked every 5; found at step 5\) \(loss nan\) at epoch 1, step 2;"):
        fit(vae, train, epochs=1, batch_size=64, progress=False, check_every=5,
            hooks=[KeepStates(saved)])
    position = saved[-1]["position"]
    assert (position["epoch"], position["step"], position["seen"]) == (1, 5, 4 * 64)
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert not all(torch.equal(p, head.before[k]) for k, p in vae.state_dict().items())


@requires_cuda
def test_a_training_step_on_cuda_never_waits_for_the_device():
    """The package's part of a step (batches, finite check, fused Adam with its on-device
    skip, zero_grad) makes no host-device synchronization, with a loss that makes none
    either (Pyro's ELBOs call .item() on the loss themselves)."""
    from pyro_vae.distributed import World
    from pyro_vae.train import Step, make_optimizer

    class Objective:
        def differentiable_loss(self, model, guide, x, **kwargs):
            loc = vae.encoder(x).base_dist.loc
            return -vae.decode(loc).log_prob(x).sum() + (loc ** 2).sum()

    train, _, _ = _digits()
    train = train.to("cuda")
    vae = VAE(64, 4, (16,)).cuda()
    params = dict(vae.named_parameters())
    step = Step(vae, Objective(), params, make_optimizer("adam", params.values()),
                World(device=torch.device("cuda")))
    generator = torch.Generator(device="cuda").manual_seed(0)
    order = torch.randperm(len(train), device="cuda", generator=generator)
    batches = train.batches(64, order=order, generator=generator)
    step(next(batches), check=False)  # first-call set-up (optimizer state) may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pyro.validation_enabled(False):  # argument checks do wait, by design
            results = [step(x, check=False) for x in batches]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(bool(finite) for _, finite, _ in results)


def test_skip_nonfinite_tolerates_and_logs_each_skipped_step(caplog):
    train, _, _ = _digits()
    head = _FaultAtStep(64, at=3)
    vae = VAE(64, 4, (16,), likelihood=head)
    head.owner.append(vae)
    with caplog.at_level("WARNING", logger="pyro_vae"):
        history = fit(vae, train, epochs=1, batch_size=64, progress=False, skip_nonfinite=1)
    skipped = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert skipped == ["non-finite loss at epoch 1, step 3: step skipped, no parameter "
                       "changed (1 of 1 allowed)"]
    assert math.isfinite(history[0]["train_elbo"])
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    with pytest.raises(ValueError, match="skip_nonfinite must be an integer >= 0"):
        fit(vae, train, epochs=1, progress=False, skip_nonfinite=-1)


def test_checkpoint_round_trip(tmp_path):
    vae = VAE(64, 4, (16,))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, vae, epoch=3, x_dim=64)
    other = VAE(64, 4, (16,))
    extras = load_checkpoint(path, other)
    assert extras == {"epoch": 3, "x_dim": 64}
    x = torch.rand(5, 64)
    assert torch.equal(vae.encode(x).mean, other.encode(x).mean)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(path, VAE(64, 5, (16,)))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch exploited",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_loading_never_unpickles_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "pyro_vae.checkpoint/1", "model": _Exploit()}, path)
    with pytest.raises(ValueError, match="evil.pt: not a readable pyro_vae checkpoint"):
        read_checkpoint(path)
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Exploit(), f)
    with pytest.raises(ValueError, match="evil.pkl: not a readable"):
        read_checkpoint(tmp_path / "evil.pkl")
    assert not (tmp_path / "exploited").exists()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    vae = VAE(64, 4, (16,))
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, vae, epoch=1, x_dim=64)
    good = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, VAE(64, 4, (16,)), epoch=2, x_dim=64)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, VAE(64, 4, (16,)), x_dim=64)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="ckpt.pt: not a readable pyro_vae checkpoint"):
        read_checkpoint(path)


def test_clipped_adam_is_pyros_and_trains():
    train, valid, _ = _digits()
    from pyro.optim.clipped_adam import ClippedAdam
    from pyro_vae.train import make_optimizer

    w = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer("clipped_adam", [w], lr=1e-3, clip_norm=0.5)
    assert isinstance(opt, ClippedAdam) and opt.defaults["clip_norm"] == 0.5
    w.grad = torch.tensor([100.0, -100.0, 0.25])
    opt.step()  # Adam's first step moves each coordinate by lr * sign(clipped gradient)
    assert torch.allclose(w, torch.tensor([-1e-3, 1e-3, -1e-3]), atol=1e-6)
    history = fit(VAE(64, 4, (16,)), train, valid, epochs=3, optimizer="clipped_adam",
                  clip_norm=1.0, lr=3e-3, progress=False)
    assert history[-1]["valid_elbo"] > history[0]["valid_elbo"]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", [w])


def test_vectorized_particles_train_with_both_losses():
    train, valid, _ = _digits()
    for loss in ("trace", "meanfield"):
        vae = VAE(64, 4, (16,))
        history = fit(vae, train, valid, epochs=2, loss=loss, num_particles=3, progress=False)
        assert history[-1]["valid_elbo"] > history[0]["valid_elbo"] - 1


@requires_cuda
def test_training_on_cuda_keeps_everything_on_the_device():
    train, valid, test = _digits()
    vae = VAE(64, 4, (16,))
    fit(vae, train, valid, epochs=1, device="cuda", progress=False)
    assert all(p.is_cuda for p in vae.parameters())
    assert all(b.is_cuda for b in vae.buffers())
    cpu_copy = copy.deepcopy(vae).cpu()
    x = test.x[:8]
    assert torch.allclose(vae.reconstruct(x.cuda()).cpu(), cpu_copy.reconstruct(x), atol=1e-4)
    assert vae.sample(4).is_cuda


def test_freeze_model_trains_only_the_new_guide():
    """fit(freeze_model=True) after swap_guide: decoder, likelihood, prior and the kept
    encoder are bitwise unchanged; the new guide moves; gradients are back on after."""
    from pyro_vae.guides import FullRankNormalEncoder

    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((64, 12), 0.3))
    data = TensorDataset(x, "toy", "train", (3, 4))
    vae = VAE(12, 3, hidden=(8,), prior="vamp", prior_options={"components": 4})
    fit(vae, data, epochs=1, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="prior is built on the guide's encoder"):
        fit(vae, data, epochs=1, batch_size=16, progress=False, freeze_model=True)
    model_before = {k: v.clone() for k, v in vae.state_dict().items()}
    vae.swap_guide(FullRankNormalEncoder(12, 3, hidden=(8,)))
    guide_before = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    fit(vae, data, epochs=2, batch_size=16, progress=False, freeze_model=True)
    after = vae.state_dict()
    for k, v in model_before.items():
        key = "kept_encoder." + k[len("encoder."):] if k.startswith("encoder.") else k
        assert torch.equal(after[key], v), key
    assert any(not torch.equal(v, vae.encoder.state_dict()[k]) for k, v in guide_before.items())
    assert all(p.requires_grad for p in vae.parameters())


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable pyro_vae checkpoint"),
    (b'{"not": "a checkpoint"}', "not a readable pyro_vae checkpoint"),
    ("torch-without-tag", "not a pyro_vae checkpoint (no 'pyro_vae.checkpoint/1' tag)"),
])
def test_empty_or_foreign_checkpoint_is_a_clear_error_naming_the_file(tmp_path, content,
                                                                      message):
    path = tmp_path / "ckpt.pt"
    if content == "torch-without-tag":  # a plain state dict, as torch.save writes it
        torch.save(VAE(64, 4, (16,)).state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_checkpoint(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_checkpoint_write_is_flushed_to_disk_and_leftovers_are_ignored(tmp_path,
                                                                       monkeypatch):
    """The temporary file is fsynced before the rename; a temporary file left by a killed
    writer does not disturb reading or the next write."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "ckpt.pt"
    vae = VAE(64, 4, (16,))
    (tmp_path / "ckpt.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(path, vae, epoch=1, x_dim=64)
    assert len(synced) == 1
    other = VAE(64, 4, (16,))
    assert load_checkpoint(path, other) == {"epoch": 1, "x_dim": 64}
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(),
                                                 other.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.k1ll3d.tmp"]


@pytest.mark.parametrize("x, message", [
    (torch.zeros(0, 64), "the train split of 'toy' is empty"),
    (torch.randint(0, 2, (50, 64)), "has dtype torch.int64; the model needs floating-point"),
    (torch.bernoulli(torch.full((50, 32), 0.5)),
     r"has points of shape \(32,\); the model takes x_dim = 64"),
    (torch.full((50, 64), float("nan")), "needs x in {0, 1}"),
])
def test_data_the_model_cannot_take_is_one_line_before_training(x, message):
    vae = VAE(64, 4, (16,))
    before = _params(vae)
    with pytest.raises(ValueError, match=message) as e:
        fit(vae, TensorDataset(x, "toy", "train", (8, 8)), epochs=1, batch_size=8,
            progress=False)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, before[k]) for k, p in _params(vae).items())


def test_best_epoch_is_the_first_best_validated_one():
    history = [{"epoch": 1, "valid_elbo": -90.0}, {"epoch": 2, "valid_elbo": None},
               {"epoch": 3, "valid_elbo": -80.0}, {"epoch": 4, "valid_elbo": -80.0},
               {"epoch": 5, "valid_elbo": -85.0}]
    assert best_epoch(history) == 3
    assert best_epoch([{"epoch": 1, "valid_elbo": None}]) == 0


def test_early_stopping_ends_patience_epochs_after_the_best():
    """With lr = 0 the model never changes: the validation ELBO is the same model's
    estimate each epoch (fresh noise), and training must stop exactly 2 epochs after
    the best of them."""
    train, valid, _ = _digits()
    vae = VAE(64, 4, (16,))
    history = fit(vae, train, valid, epochs=30, lr=0.0, progress=False, early_stopping=2)
    best = best_epoch(history)
    assert len(history) == best + 2 < 30
    assert all(r["valid_elbo"] < history[best - 1]["valid_elbo"] for r in history[best:])
    with pytest.raises(ValueError, match="early_stopping must be an integer >= 0"):
        fit(vae, train, valid, epochs=1, progress=False, early_stopping=-1)
