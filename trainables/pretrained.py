"""External pre-trained weights: read a checkpoint file in any common layout and load what fits a backbone's body.

Understood layouts:
- nested dicts: the tensors may sit under ``state_dict``, ``model``, ``net``, ``network_weights``,
  ``model_state_dict``, ``module`` or ``teacher`` (one level or several);
- key prefixes ``module.`` (DataParallel), ``backbone.``, ``swinViT.``, ``encoder.``, ``model.``, ``net.``;
- MONAI's own key names of ``SwinUNETR``, ``SegResNet`` and ``BasicUNet`` (each backbone knows the MONAI
  name of every body tensor: ``MultiTaskNet.native_keys``), e.g. MONAI's self-supervised SwinUNETR
  weights (``{"state_dict": {"module.patch_embed.proj.weight": ...}}``, the ``swinViT`` encoder only);
- a checkpoint written by this project: a pre-training ``body.pt`` or its cache folder.

Every body tensor is matched by name and then checked by shape. :class:`LoadReport` counts the tensors
loaded, missing, unexpected and shape-mismatched, and the fraction of the body's and of the encoder's
parameters loaded. Nothing is ever downloaded. Pure PyTorch: never imports Ray or MLflow.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from trainables.backbones import MultiTaskNet
from trainables.errors import StudyInputError

NESTED_KEYS = ("state_dict", "model", "net", "network_weights", "model_state_dict", "module", "teacher")
PREFIXES = ("module.", "backbone.", "swinViT.", "encoder.", "model.", "net.")
MIN_FRACTION = 0.5  # default: refuse a checkpoint that loads less than half of the encoder's parameters


@dataclass
class LoadReport:
    """What a checkpoint gave a backbone's body. Fractions count parameters (elements), not tensors."""

    file: str
    sha256: str
    backbone: str
    width: int
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # body tensors the checkpoint does not have
    unexpected: list[str] = field(default_factory=list)  # checkpoint tensors no body tensor takes
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs body shape"
    loaded_fraction: float = 0.0  # of the body's parameters
    encoder_loaded_fraction: float = 0.0  # of the encoder's parameters

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.file} -> {self.backbone} width {self.width}: {self.loaded} tensors loaded, "
                f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.mismatched)} of another "
                f"shape; {self.loaded_fraction:.0%} of the body's parameters, {self.encoder_loaded_fraction:.0%} of "
                "the encoder's")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_file(path: str | Path) -> Path:
    """The weights file of ``path``: the file itself, or ``body.pt`` in a pre-training cache folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "body.pt"
    if not path.is_file():
        raise StudyInputError(f"pre-trained checkpoint {path} does not exist; give the path of a .pt/.pth/.ckpt file "
                              "or of a pre-training cache folder (holding body.pt)")
    return path


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (name -> tensor), unwrapping nested dicts; never runs pickled code."""
    file = checkpoint_file(path)
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or pickled-code file: one line for all
        reason = " ".join(str(exc).split())[:200]
        raise StudyInputError(f"pre-trained checkpoint {file} cannot be read as PyTorch weights ({reason}); "
                              "save it with torch.save(model.state_dict(), path)") from None
    for _ in range(4):
        if not isinstance(payload, dict):
            break
        tensors = {k: v for k, v in payload.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        inner = next((payload[k] for k in NESTED_KEYS if isinstance(payload.get(k), dict)), None)
        if inner is None:
            break
        payload = inner
    raise StudyInputError(f"pre-trained checkpoint {file} holds no tensors under its top level or under "
                          f"{', '.join(NESTED_KEYS)}; save a state dict (name -> tensor)")


def _stripped(key: str) -> list[str]:
    """``key`` and every form of it with leading known prefixes removed, longest first."""
    forms = [key]
    while True:
        head = next((p for p in PREFIXES if forms[-1].startswith(p)), None)
        if head is None:
            return forms
        forms.append(forms[-1][len(head):])


def match_state(state: dict[str, torch.Tensor], model: MultiTaskNet, file: str = "checkpoint",
                sha256: str = "") -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The body tensors of ``model`` that ``state`` provides (by name, then shape), and the report."""
    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in ("encoder", "decoder")}
    native = getattr(model, "native_keys", {})
    index: dict[str, str] = {}  # a name a checkpoint may use -> our key; our own names win over MONAI's
    for key in own:
        for name in reversed(_stripped(native[key])) if key in native else []:
            index.setdefault(name, key)
    for key in own:
        index[key] = key
    taken: dict[str, torch.Tensor] = {}
    report = LoadReport(file=str(file), sha256=sha256, backbone=model.config.name, width=model.config.width)
    for name, tensor in state.items():
        key = next((index[f] for f in _stripped(name) if f in index), None)
        if key is None or key in taken:
            report.unexpected.append(name)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs body {tuple(own[key].shape)}")
        else:
            taken[key] = tensor.to(own[key].dtype)
    mismatched = {m.split(":")[0] for m in report.mismatched}
    report.missing = sorted(k for k in own if k not in taken and k not in mismatched)
    report.loaded = len(taken)

    def share(keys: list[str]) -> float:
        total = sum(own[k].numel() for k in keys if own[k].is_floating_point())
        return sum(own[k].numel() for k in keys if k in taken and own[k].is_floating_point()) / max(total, 1)

    report.loaded_fraction = share(list(own))
    report.encoder_loaded_fraction = share([k for k in own if k.startswith("encoder.")])
    return taken, report


def load_pretrained(path: str | Path, model: MultiTaskNet, min_fraction: float = MIN_FRACTION,
                    sha256: str | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Match the checkpoint at ``path`` against ``model``'s body; refuse (StudyInputError, one line naming
    the file and what did not match) when less than ``min_fraction`` of the encoder's parameters load.

    Returns the body state to load (the body's own tensors where the checkpoint has none) and the report."""
    file = checkpoint_file(path)
    taken, report = match_state(read_state(file), model, str(file), sha256 or file_sha256(file))
    if report.encoder_loaded_fraction < min_fraction:
        cause = (f"{len(report.mismatched)} tensors of another shape (e.g. {report.mismatched[0]}): was it trained "
                 f"at another width than {model.config.width}? set the study's width (grid file: width) to match"
                 if report.mismatched else
                 f"no name matched (e.g. checkpoint {next(iter(report.unexpected), '-')!r}, body "
                 f"{next(iter(report.missing), '-')!r}): is it a {model.config.name} checkpoint?")
        raise StudyInputError(
            f"pre-trained checkpoint {file} loads {report.encoder_loaded_fraction:.0%} of {model.config.name}'s "
            f"encoder (at least {min_fraction:.0%} needed): {cause}"
        )
    body = {k: v.detach().clone() for k, v in model.body_state_dict().items()}
    body.update(taken)
    return body, report
