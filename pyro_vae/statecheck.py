"""Checks of a training state read from a file (``pyro_vae.checkpoints.TrainState``):
every field against what it must be, and the optimizer state against the parameters it
will be loaded into, before anything is loaded (a fused Adam trusts its state: a tensor of
the wrong shape corrupts memory). Each refusal is one line naming the file and the field
(``where``)."""

import math
from typing import Dict, List, Optional

import torch


def short(value) -> str:
    """``repr(value)``, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _real(value) -> bool:
    """A finite int or float (not a bool)."""
    return type(value) in (int, float) and math.isfinite(value)


def check_progress(position, epochs_done: int, where: str) -> None:
    """The position (a ``pyro_vae.checkpoints.Position``) agrees with the history and
    the data: the epoch after the history's last, a step within the epoch's batches, the
    epoch's order drawn once a step is done, and no more points seen than those steps
    took."""
    steps = math.ceil(position.num_data / position.batch_size)
    if position.epoch != epochs_done + 1:
        raise ValueError(f"{where}.epoch is {position.epoch}, but the history holds "
                         f"{epochs_done} epochs (expected epoch {epochs_done + 1})")
    if position.step > steps:
        raise ValueError(f"{where}.step must be <= {steps} (the batches of {position.num_data} "
                         f"points in batches of {position.batch_size}), got {position.step}")
    if position.step > 0 and position.order is None:
        raise ValueError(f"{where}.order is missing, but {position.step} steps of the epoch "
                         f"are done")
    most = min(position.num_data, position.step * position.batch_size)
    if position.seen > most:
        raise ValueError(f"{where}.seen must be <= {most} (the points of {position.step} "
                         f"steps), got {position.seen}")


def check_history(history: List[Dict], where: str) -> None:
    """Each epoch's record holds plain values (numbers, text, null), and a finite beta,
    training ELBO and time."""
    for i, record in enumerate(history):
        for key, value in record.items():
            if not isinstance(key, str) or not (value is None or type(value) in (
                    bool, int, float, str)):
                raise ValueError(f"{where}[{i}].{key} must be a number, text or null, "
                                 f"got {short(value)}")
        for key in ("beta", "train_elbo", "seconds"):
            if not _real(record.get(key)):
                raise ValueError(f"{where}[{i}].{key} must be a finite number, got "
                                 f"{short(record.get(key))}")
        bad = next((k for k, v in record.items() if k.startswith("valid_") and v is not None
                    and type(v) not in (int, float)), None)
        if bad is not None:
            raise ValueError(f"{where}[{i}].{bad} must be a number or null, got "
                             f"{short(record[bad])}")


# Adam's (and ClippedAdam's) state of one parameter; with amsgrad, max_exp_avg_sq too.
_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
# Options of a parameter group that must lie in a range (lr and clip_norm are replaced
# by the resuming call's): name -> (smallest, strictly above it).
_GROUP_NUMBERS = {"eps": (0.0, True), "weight_decay": (0.0, False), "lrd": (0.0, True)}


def check_optimizer_layout(saved: Dict, where: str) -> None:
    """The layout of ``{"parameters": names, "state": optimizer.state_dict()}``: distinct
    names, groups that hold each parameter index once, each group's options in range, and
    each parameter's state the tensors Adam keeps, finite, with a whole step >= 0."""
    names = saved["parameters"]
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise ValueError(f"{where}.parameters must be distinct parameter names")
    state = saved["state"]
    groups, entries = state.get("param_groups"), state.get("state")
    if not (isinstance(groups, list) and groups and isinstance(entries, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in groups)):
        raise ValueError(f"{where}.state must hold 'param_groups' (a list of groups with "
                         f"'params') and 'state' (a dict)")
    indices = [i for g in groups for i in g["params"]]
    if not (all(type(i) is int for i in indices)
            and sorted(indices) == list(range(len(names)))):
        raise ValueError(f"{where}.state.param_groups must hold each of the {len(names)} "
                         f"parameters' indices once, got {short(indices)}")
    group_of = {}
    for g, group in enumerate(groups):
        _check_group(group, f"{where}.state.param_groups[{g}]")
        group_of.update(dict.fromkeys(group["params"], group))
    for key, entry in entries.items():
        if key not in group_of or not isinstance(entry, dict):
            raise ValueError(f"{where}.state.state holds {short(key)}, not the state of one "
                             f"of the {len(names)} parameters")
        _check_entry(entry, bool(group_of[key].get("amsgrad")),
                     f"{where}.state.state[{key}]")


def _check_group(group: Dict, where: str) -> None:
    betas = group.get("betas")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{where}.betas must be two numbers in [0, 1), got {short(betas)}")
    for key, (low, strict) in _GROUP_NUMBERS.items():
        value = group.get(key, low + 1)
        if not (_real(value) and (value > low if strict else value >= low)):
            raise ValueError(f"{where}.{key} must be a finite number "
                             f"{'>' if strict else '>='} {low:g}, got {short(value)}")


def _check_entry(entry: Dict, amsgrad: bool, where: str) -> None:
    expected = set(_ADAM_STATE) | ({"max_exp_avg_sq"} if amsgrad else set())
    if set(entry) != expected:
        raise ValueError(f"{where} must hold {sorted(expected)}, got {short(sorted(entry, key=str))}")
    step = entry["step"]
    if isinstance(step, torch.Tensor) and step.dim() == 0:
        step = step.item()
    if not (_real(step) and step >= 0 and step == int(step)):
        raise ValueError(f"{where}.step must be a whole number >= 0, got {short(step)}")
    for key in sorted(expected - {"step"}):
        t = entry[key]
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()
                and bool(torch.isfinite(t).all())
                and (key == "exp_avg" or not bool((t < 0).any()))):
            raise ValueError(f"{where}.{key} must be a tensor of finite "
                             f"{'' if key == 'exp_avg' else 'non-negative '}values")


def check_optimizer_state(saved: Dict, params: Dict[str, torch.Tensor], where: str,
                          optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Refuse, in one line naming ``where`` and the field, a saved optimizer state that
    does not fit ``params`` (name -> parameter, the model's): a name it lacks, a state
    tensor of another shape, dtype or device than its parameter (a fused Adam trusts
    these: a wrong shape corrupts memory). With ``optimizer`` (built on ``params``), its
    groups' sizes and flags (``fused``, ``amsgrad``, ...) must be the saved ones too."""
    check_optimizer_layout(saved, where)
    names, groups = saved["parameters"], saved["state"]["param_groups"]
    unknown = next((n for n in names if n not in params), None)
    if unknown is not None:
        raise ValueError(f"{where}: the saved optimizer state is for other parameters "
                         f"({unknown!r} is not one of this model's)")
    if optimizer is not None:
        _check_groups_match(groups, optimizer.param_groups, where)
    # The j-th index of the saved groups, in order, is the j-th parameter (load_state_dict).
    name_of = dict(zip((i for g in groups for i in g["params"]), names))
    for key, entry in saved["state"]["state"].items():
        param = params[name_of[key]]
        for field, t in entry.items():
            if field != "step" and (t.shape != param.shape or t.dtype != param.dtype
                                    or t.device.type not in ("cpu", param.device.type)):
                raise ValueError(
                    f"{where}.state.state[{key}].{field} is {t.dtype} {tuple(t.shape)} on "
                    f"{t.device.type}; parameter {name_of[key]} is {param.dtype} "
                    f"{tuple(param.shape)} on {param.device.type}")


def _check_groups_match(groups: List[Dict], live: List[Dict], where: str) -> None:
    sizes = [len(g["params"]) for g in live]
    if [len(g["params"]) for g in groups] != sizes:
        raise ValueError(f"{where}.state.param_groups hold {[len(g['params']) for g in groups]} "
                         f"parameters; the optimizer's hold {sizes}")
    for g, (group, mine) in enumerate(zip(groups, live)):
        unknown = sorted(set(group) - set(mine), key=str)
        if unknown:
            raise ValueError(f"{where}.state.param_groups[{g}] has unknown options "
                             f"{short(unknown)}")
        for key, value in mine.items():
            if (isinstance(value, bool) or value is None) and key in group and (
                    type(group[key]) is not type(value) or group[key] != value):
                raise ValueError(f"{where}.state.param_groups[{g}].{key} is "
                                 f"{short(group[key])}; this optimizer has {value!r}")


def check_rng_state(rng: Dict, where: str) -> None:
    """What ``get_rng_state`` saves, each generator's state of its kind and size (a state
    of another size is refused here, not half-restored)."""
    size = torch.get_rng_state().numel()

    def byte_state(value, name, numel=None):
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                and value.dim() == 1 and (numel is None or value.numel() == numel)):
            raise ValueError(f"{where}.{name} must be a generator state (a uint8 tensor"
                             f"{f' of {numel} bytes' if numel else ''}), got {short(value)}")

    unknown = sorted(set(rng) - {"torch", "python", "numpy", "generator",
                                 "generator_device", "cuda", "ranks"}, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown fields {short(unknown)}")
    byte_state(rng.get("torch"), "torch", size)
    if rng.get("generator_device") not in ("cpu", "cuda"):
        raise ValueError(f"{where}.generator_device must be 'cpu' or 'cuda', got "
                         f"{short(rng.get('generator_device'))}")
    byte_state(rng.get("generator"), "generator",
               size if rng["generator_device"] == "cpu" else None)
    python = rng.get("python")
    if not (isinstance(python, tuple) and len(python) == 3 and python[0] == 3
            and isinstance(python[1], tuple) and len(python[1]) == 625
            and all(type(k) is int and 0 <= k < 2 ** 32 for k in python[1])
            and python[1][-1] <= 624 and (python[2] is None or _real(python[2]))):
        raise ValueError(f"{where}.python must be a state of Python's random module")
    numpy = rng.get("numpy")
    if not (isinstance(numpy, dict) and set(numpy) == {"keys", "pos", "has_gauss",
                                                       "cached_gaussian"}
            and isinstance(numpy["keys"], torch.Tensor) and numpy["keys"].shape == (624,)
            and numpy["keys"].dtype == torch.int64
            and bool(((numpy["keys"] >= 0) & (numpy["keys"] < 2 ** 32)).all())
            and type(numpy["pos"]) is int and 0 <= numpy["pos"] <= 624
            and numpy["has_gauss"] in (0, 1) and _real(numpy["cached_gaussian"])):
        raise ValueError(f"{where}.numpy must be a state of NumPy's MT19937 generator")
    for i, value in enumerate(_listed(rng.get("cuda", []), f"{where}.cuda")):
        byte_state(value, f"cuda[{i}]")
    for i, streams in enumerate(_listed(rng.get("ranks", []), f"{where}.ranks")):
        if not (isinstance(streams, dict) and "torch" in streams
                and set(streams) <= {"torch", "cuda"}):
            raise ValueError(f"{where}.ranks[{i}] must hold the process's 'torch' (and "
                             f"'cuda') streams")
        byte_state(streams["torch"], f"ranks[{i}].torch", size)
        if "cuda" in streams:
            byte_state(streams["cuda"], f"ranks[{i}].cuda")


def _listed(value, where: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list, got {short(value)}")
    return list(value)
