import copy
import math
import os
import pickle
import stat
import time

import pytest
import torch

import pyro

from pyro_vae import VAE, elbo, fit, load_checkpoint, read_checkpoint, save_checkpoint
from pyro_vae.datasets import TensorDataset, load
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.hooks import Hook, best_epoch
from pyro_vae.train import TrainingDiverged


class KeepStates(Hook):
    """Keeps every checkpointed training state, as the dict a checkpoint file holds."""

    def __init__(self, states):
        self.states = states

    def on_checkpoint(self, state):
        self.states.append(state.to_dict())


class _OnCheckpoint(Hook):
    """Calls ``fn(state)`` at each checkpoint (the first comes after all set-up, before
    the first training step)."""

    def __init__(self, fn):
        self.fn = fn

    def on_checkpoint(self, state):
        self.fn(state)


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


def test_hooks_see_each_record_once_and_a_true_return_stops_training():
    """Hooks (an object and a plain function) are called once per epoch with the record
    that has just been appended to the history; the function returns True after epoch 2
    of 5, so training stops there, yet the other hook still sees epoch 2. on_checkpoint
    comes before the first step and after each epoch. ``seconds`` is positive and, summed
    over the epochs, within the wall-clock time of the whole call."""
    train, valid, _ = _digits()
    seen, checkpoints = [], []

    class Watcher(Hook):
        def on_epoch_end(self, record, history, model):
            seen.append(("object", record, len(history), history[-1] is record, model))

        def on_checkpoint(self, state):
            checkpoints.append((state.epochs_done, len(state.history)))

    def stop_after_two(record, history, model):
        seen.append(("function", record, len(history), history[-1] is record, model))
        return record["epoch"] == 2

    vae = VAE(64, 4, (16,))
    start = time.perf_counter()
    history = fit(vae, train, valid, epochs=5, progress=False,
                  hooks=[stop_after_two, Watcher()])
    wall = time.perf_counter() - start
    assert [r["epoch"] for r in history] == [1, 2]
    assert [(kind, n, last, model is vae) for kind, _, n, last, model in seen] == [
        ("function", 1, True, True), ("object", 1, True, True),
        ("function", 2, True, True), ("object", 2, True, True)]
    assert all(record is history[n - 1] for _, record, n, _, _ in seen)
    assert checkpoints == [(0, 0), (1, 1), (2, 2)]
    assert all(set(r) == {"epoch", "beta", "train_elbo", "valid_elbo", "seconds", "loss"}
               for r in history)
    assert all(r["loss"] == "TraceMeanField_ELBO" for r in history)
    assert all(r["beta"] == 1.0 for r in history)
    assert all(r["seconds"] > 0 for r in history)
    assert sum(r["seconds"] for r in history) < wall


def test_history_elbos_are_the_frozen_models_elbos():
    """With lr = 0 nothing moves, so each record's ELBOs are ELBOs of one fixed model.

    Exactly, by reseeding: the torch random state and the batch are recorded as each
    training step's guide runs (and as each validation starts); replaying the same
    draws, -(sum over the epoch's batches of the unscaled meanfield loss) / N is the
    record's train_elbo (the N / B scaling of a step undone exactly once; float32 sums:
    1e-6 relative), and ``elbo(model, valid)`` is its valid_elbo, bitwise. Each epoch's
    batches are a permutation of the training set.

    Statistically: train_elbo is a one-draw-per-point estimate of ``elbo(model, train,
    loss="meanfield")``; it agrees with a fresh estimate (seed 0) within 4 standard
    errors of the difference of two such estimates, the standard error measured from 20
    seeds (0.013 nats here, for ELBOs of -46.4; the records are 0.01 and 0.04 away). A
    train_elbo off by the N / B scaling (10x here) or summed instead of averaged would
    be off by hundreds of nats."""
    import dataclasses

    from pyro_vae.objectives import make_elbo

    train, valid, _ = _digits()
    # Binarized once (as valid is), not per batch: each point is then the same in every
    # batch and in every evaluation.
    train = dataclasses.replace(train, dynamic_binarize=False, x=torch.bernoulli(
        train.x, generator=torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,))
    before = _params(vae)
    started, steps, validations = [], [], []

    def record(module, args):
        if not started:
            return  # set-up: probes of the model before the first checkpoint
        if vae.training and torch.is_grad_enabled():
            steps.append((torch.get_rng_state(), args[0].clone()))
        elif not vae.training:
            validations.append(torch.get_rng_state())

    handle = vae.encoder.register_forward_pre_hook(record)
    try:
        history = fit(vae, train, valid, epochs=2, lr=0.0, batch_size=128, progress=False,
                      hooks=[_OnCheckpoint(lambda state: started.append(1))])
    finally:
        handle.remove()
    assert all(torch.equal(before[k], v) for k, v in _params(vae).items())
    per_epoch = math.ceil(len(train) / 128)
    assert len(steps) == 2 * per_epoch and len(validations) == 2  # 250 points: one batch

    def same_rows(a, b):  # the same multiset of rows
        (ua, ca), (ub, cb) = (torch.unique(t, dim=0, return_counts=True) for t in (a, b))
        return torch.equal(ua, ub) and torch.equal(ca, cb)

    meanfield = make_elbo("meanfield")
    for epoch, record in enumerate(history):
        taken = steps[epoch * per_epoch:(epoch + 1) * per_epoch]
        points = torch.cat([x for _, x in taken])
        assert same_rows(points, train.x), f"epoch {epoch + 1}: not each point once"
        total = 0.0
        with torch.no_grad():
            for state, x in taken:
                torch.set_rng_state(state)
                total += meanfield.loss(vae.model, vae.guide, x)
        assert record["train_elbo"] == pytest.approx(-total / len(train), rel=1e-6)
        torch.set_rng_state(validations[epoch])
        assert record["valid_elbo"] == elbo(vae, valid)
    assert history[0]["train_elbo"] != history[1]["train_elbo"]  # fresh draws each epoch
    fresh = torch.tensor([elbo(vae, train, loss="meanfield", seed=s) for s in range(20)])
    se = fresh.std().item()
    assert 0 < se < 0.05
    for record in history:
        assert abs(record["train_elbo"] - fresh[0].item()) < 4 * math.sqrt(2) * se


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


def cuda_step(vae, train):
    """A ``Step`` of ``vae`` on CUDA whose loss makes no host-device synchronization
    itself (Pyro's ELBOs call .item() on the loss), and an epoch of ``train``'s batches
    of 64 there."""
    from pyro_vae.distributed import World
    from pyro_vae.train import Step, make_optimizer

    class Objective:
        def differentiable_loss(self, model, guide, x, **kwargs):
            loc = vae.encoder(x).base_dist.loc
            return -vae.decode(loc).log_prob(x).sum() + (loc ** 2).sum()

    params = dict(vae.named_parameters())
    step = Step(vae, Objective(), params, make_optimizer("adam", params.values()),
                World(device=torch.device("cuda")))
    generator = torch.Generator(device="cuda").manual_seed(0)
    order = torch.randperm(len(train), device="cuda", generator=generator)
    return step, train.batches(64, order=order, generator=generator)


@requires_cuda
def test_a_training_step_on_cuda_never_waits_for_the_device():
    """The package's part of a step (batches, finite check, fused Adam with its on-device
    skip, zero_grad) makes no host-device synchronization, with a loss that makes none
    either."""
    train, _, _ = _digits()
    step, batches = cuda_step(VAE(64, 4, (16,)).cuda(), train.to("cuda"))
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


def test_clipped_adam_clips_each_gradient_entry_then_follows_pyros_rule():
    """make_optimizer("clipped_adam") against a hand computation of Pyro's ClippedAdam:
    g <- clamp(g, -c, c); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
    p <- p - lr_t sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), lr_t = lr * lrd^t.
    Two steps with gradients having entries above, below and at -c: the first moments
    after step 1 are (1 - b1) times the *clipped* gradient, and step 2 (where Adam no
    longer moves by +-lr whatever the gradient) lands where the clipped rule says, not
    where the unclipped one would. float64 throughout: agreement to 1e-12."""
    from pyro.optim.clipped_adam import ClippedAdam
    from pyro_vae.train import make_optimizer

    lr, c = 0.1, 1.0
    p0 = torch.tensor([0.5, -0.3, 2.0, 0.0], dtype=torch.float64)
    grads = [torch.tensor([3.0, -0.2, -5.0, 0.7], dtype=torch.float64),
             torch.tensor([-4.0, 0.5, 1.0, -0.1], dtype=torch.float64)]
    p = torch.nn.Parameter(p0.clone())
    opt = make_optimizer("clipped_adam", [p], lr=lr, clip_norm=c)
    assert isinstance(opt, ClippedAdam)
    group = opt.param_groups[0]
    (b1, b2), eps, lrd = group["betas"], group["eps"], group["lrd"]
    assert (b1, b2, eps, lrd, group["clip_norm"]) == (0.9, 0.999, 1e-8, 1.0, c)

    def by_hand(clip):
        q, m, v, out = p0.clone(), torch.zeros(4, dtype=torch.float64), \
            torch.zeros(4, dtype=torch.float64), []
        for t, g in enumerate(grads, start=1):
            g = g.clamp(-clip, clip)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            step_size = lr * lrd ** t * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            q = q - step_size * m / (v.sqrt() + eps)
            out.append((q.clone(), m.clone(), v.clone()))
        return out

    expected, unclipped = by_hand(c), by_hand(math.inf)
    for t, g in enumerate(grads):
        p.grad = g.clone()
        opt.step()
        q, m, v = expected[t]
        state = opt.state[p]
        assert state["step"] == t + 1
        assert torch.allclose(state["exp_avg"], m, rtol=0, atol=1e-12)
        assert torch.allclose(state["exp_avg_sq"], v, rtol=0, atol=1e-12)
        assert torch.allclose(p.detach(), q, rtol=0, atol=1e-12)
    # After step 1 the first moment is (1 - b1) * clamp(g1): 0.1 * [1, -0.2, -1, 0.7].
    assert torch.allclose(expected[0][1], torch.tensor([0.1, -0.02, -0.1, 0.07],
                                                       dtype=torch.float64), atol=1e-15)
    # The clipping is visible in the parameters: without it step 2 ends elsewhere.
    assert (expected[1][0] - unclipped[1][0]).abs().max() > 1e-3
    assert group["lr"] == lr  # lrd = 1: no decay
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer("sgd", [p])


@pytest.mark.parametrize("optimizer", ["clipped_adam", "adam"])
def test_fit_uses_the_optimizer_it_is_given(optimizer):
    """One step of fit (one batch of the whole set) with clip_norm c = 1e-7, far below
    the gradient entries. Clipped Adam's first step moves every coordinate whose gradient
    exceeds c by exactly lr * c / (c + eps / sqrt(1 - b2)) = 0.2403 lr (the bias
    corrections cancel), never more; plain Adam moves them by lr * |g| / (|g| + 3.2e-7),
    about lr. Tolerance 1e-3 relative (float32 parameters of size <~ 1 moved by ~1e-3)."""
    train, _, _ = _digits()
    lr, c, eps, b2 = 1e-2, 1e-7, 1e-8, 0.999
    clipped_move = lr * c / (c + eps / math.sqrt(1 - b2))
    torch.manual_seed(0)
    vae = VAE(64, 4, (16,))
    before = _params(vae)
    fit(vae, train, epochs=1, batch_size=len(train), lr=lr, optimizer=optimizer,
        clip_norm=c, progress=False)
    moves = torch.cat([(p.detach() - before[k]).abs().flatten()
                       for k, p in vae.named_parameters()])
    moved = moves[moves > 0]
    assert len(moved) > 0.8 * len(moves)  # most coordinates had a gradient (92% here)
    at_clip = torch.isclose(moved, torch.tensor(clipped_move), rtol=1e-3, atol=0)
    if optimizer == "clipped_adam":
        assert moved.max() <= clipped_move * (1 + 1e-3)
        assert at_clip.float().mean() > 0.9
    else:
        assert moved.max() > 0.99 * lr
        assert at_clip.float().mean() < 0.1


@pytest.mark.parametrize("loss", ["trace", "meanfield"])
def test_k_vectorized_particles_average_k_single_particle_losses(loss):
    """The loss fit builds with num_particles=K draws K particles per point in one
    vectorized pass and returns the mean of the K one-particle losses computed by hand
    with the same draws: for "trace" -[log p(x|z_k) + log p(z_k) - log q(z_k|x)], for
    "meanfield" -[log p(x|z_k) - KL(q(z|x) || p(z))] with the KL in closed form. The K
    single losses differ from each other by far more than the tolerance (1e-5 relative,
    float32 sums), so a loss built from fewer particles cannot pass."""
    from pyro_vae.objectives import make_elbo
    from torch.distributions import kl_divergence

    K = 3
    torch.manual_seed(0)
    vae = VAE(12, 3, (8,))
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    objective = make_elbo(loss, K)
    draws = []

    def guide(x, num_data=None):  # the model's guide, recording what it drew
        z = vae.guide(x, num_data)
        draws.append(z.detach())
        return z

    value = objective.loss(vae.model, guide, x)
    assert len(draws) == 1 and draws[0].shape == (K, 5, 3)  # one pass, K particles
    with torch.no_grad():
        q, p = vae.encode(x), vae.p_z()
        singles = []
        for z in draws[0]:
            recon = vae.decode(z).log_prob(x).sum()
            kl = (q.log_prob(z) - p.log_prob(z)).sum() if loss == "trace" \
                else kl_divergence(q.base_dist, p.base_dist.expand(q.base_dist.batch_shape)
                                   ).sum()
            singles.append(-(recon - kl).item())
    assert value == pytest.approx(sum(singles) / K, rel=1e-5)
    # Not one particle's loss: each is > 0.3 nats (7e-3 relative) from the mean here.
    assert all(abs(s - value) > 5e-3 * abs(value) for s in singles)


def test_fit_trains_with_vectorized_particles():
    """fit(num_particles=3): every training step decodes 3 particles per point (the
    decoder sees z of shape (3, B, z_dim)), and training raises the validation ELBO
    (lr 1e-2, 3 epochs: from -46.5 to -28.9 nats per point with these seeds under both
    losses; demanded: +10, far beyond the Monte Carlo error of each estimate)."""
    train, valid, _ = _digits()
    for loss in ("trace", "meanfield"):
        torch.manual_seed(0)
        vae = VAE(64, 4, (16,))
        started, steps = [], []  # decoder inputs of the training steps

        def record(module, args):
            if started and torch.is_grad_enabled():
                steps.append(tuple(args[0].shape))

        handle = vae.decoder.register_forward_pre_hook(record)
        before = elbo(vae, valid, seed=0)
        try:  # the first checkpoint comes after all set-up, before the first step
            fit(vae, train, epochs=3, loss=loss, num_particles=3, batch_size=128, lr=1e-2,
                progress=False, hooks=[_OnCheckpoint(lambda state: started.append(1))])
        finally:
            handle.remove()
        after = elbo(vae, valid, seed=0)
        sizes = [128] * (len(train) // 128) + [len(train) % 128]  # 10 of 128, one of 17
        assert steps == [(3, b, 4) for b in sizes] * 3, loss
        assert after > before + 10, (loss, before, after)


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
    """The temporary file is fsynced before the rename, the folder after it; a temporary
    file left by a killed writer does not disturb reading or the next write."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode),
                                                 real_fsync(fd)))
    path = tmp_path / "ckpt.pt"
    vae = VAE(64, 4, (16,))
    (tmp_path / "ckpt.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(path, vae, epoch=1, x_dim=64)
    assert len(synced) == 2 and stat.S_ISREG(synced[0]) and stat.S_ISDIR(synced[1])
    other = VAE(64, 4, (16,))
    assert load_checkpoint(path, other) == {"epoch": 1, "x_dim": 64}
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(),
                                                 other.state_dict().values()))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.k1ll3d.tmp"]


@pytest.mark.parametrize("x, message", [
    (torch.zeros(0, 64), "the train split of 'toy' is empty"),
    (torch.randint(0, 2, (50, 64)), "has dtype torch.int64; the model's parameters are torch.float32"),
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


def test_progress_in_a_log_file_is_one_line_per_epoch(capsys):
    """Where standard error is not a terminal (a log file, a pipe, pytest's capture),
    fit draws no progress bar; it prints one line per epoch."""
    train, valid, _ = _digits()
    fit(VAE(64, 4, (16,)), train, valid, epochs=3, progress=True)
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines] == [["epoch", "1"], ["epoch", "2"],
                                                    ["epoch", "3"]]
    assert all("train ELBO" in line and "valid ELBO" in line for line in lines)
