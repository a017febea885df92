"""What the benchmark times: one :class:`Config` per shape, dtype and mode, grouped in
named suites. Shapes follow docs/design.md#measuring (canonical B=16, T=1024, I=H=768 and the
batch/hidden/sequence sweeps); on CPU the base shape is smaller so suites finish.
"""

from __future__ import annotations

import dataclasses

import torch

CELLS = ("lstm", "gru")
GATES = {"lstm": 4, "gru": 3}
MODES = ("forward", "forward_backward")
DTYPES_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = tuple(DTYPES_TORCH)

#: The swept values of docs/design.md#measuring.
BATCHES = (1, 2, 8, 16, 32, 64, 128, 256)
HIDDENS = (128, 256, 512, 1024, 2048)
STEPS = (256, 512, 1024, 2048, 4096)
#: Short sequences, where the per-call cost of a layer, not its steps, decides; and the
#: cells stepped from Python (a decoder's or an RL policy's loop), one call per step.
SHORT_STEPS = (1, 2, 4, 8, 16, 32)
#: FlashRNN's head sweep: heads of size D. Our layers are dense (one head), so the
#: comparable configuration is one head of size D, i.e. H = D.
HEAD_SIZES = (64, 128, 256, 512, 768)

CANONICAL = dict(batch=16, steps=1024, input_size=768, hidden_size=768)
#: Base shape of the quick suite and of the sweeps, per device type.
QUICK = {"cpu": dict(batch=16, steps=32, input_size=128, hidden_size=128),
         "cuda": dict(batch=16, steps=256, input_size=256, hidden_size=256)}
SWEEP_BASE = {"cpu": dict(batch=16, steps=32, input_size=256, hidden_size=256), "cuda": CANONICAL}
DEFAULT_DTYPES = {"cpu": ("float32",), "cuda": ("bfloat16", "float16")}
#: CNN-LSTM models (cnnlstm_fast.models.CNNLSTM): conv="1d" on (B, T, C) sequences and
#: conv="2d" on (B, T, C, 32, 32) frames; 2 layers, bidirectional.
MODELS = {
    "cpu": (dict(model="cnnlstm-1d", batch=16, steps=64, input_size=32, hidden_size=128),
            dict(model="cnnlstm-2d", batch=4, steps=16, input_size=3, hidden_size=128)),
    "cuda": (dict(model="cnnlstm-1d", batch=32, steps=512, input_size=64, hidden_size=256),
             dict(model="cnnlstm-2d", batch=16, steps=32, input_size=3, hidden_size=256)),
}
FRAME = 32  # height and width of the cnnlstm-2d frames
#: The short-seq suite's bases: batch 1 and 16 at I=H=256 (CPU) or 768 (CUDA).
SHORT_BASE = {"cpu": dict(steps=1, input_size=256, hidden_size=256),
              "cuda": dict(steps=1, input_size=768, hidden_size=768)}
#: Config.model of a cell (nn.LSTMCell / nn.GRUCell) called once per step from Python.
CELL_LOOP = "cell"


def is_model(shape: dict) -> bool:
    """Whether a shape is a whole CNN-LSTM model (not a layer or a cell loop)."""
    return shape.get("model", "") not in ("", CELL_LOOP)


@dataclasses.dataclass(frozen=True)
class Config:
    cell: str
    batch: int
    steps: int
    input_size: int
    hidden_size: int
    layers: int = 1
    directions: int = 1
    dtype: str = "float32"
    mode: str = "forward"
    device: str = "cpu"
    model: str = ""  # "" for a bare layer, "cell" for a cell loop, else "cnnlstm-1d" / "cnnlstm-2d"
    sweep: str = ""  # the swept variable ("batch", "hidden_size", "steps") for plots

    @property
    def name(self) -> str:
        """Group name: everything but the provider."""
        what = f"{self.model}-{self.cell}" if self.model else self.cell
        return (f"{what} B{self.batch} T{self.steps} I{self.input_size} H{self.hidden_size} "
                f"L{self.layers} D{self.directions} {self.dtype} {self.mode}")

    @property
    def recurrent_steps(self) -> int:
        """Sequential steps a step-by-step implementation runs (cost of ``reference``)."""
        return self.steps * self.layers * self.directions

    @property
    def flops(self) -> int:
        """Matmul FLOPs of the recurrent layers: per layer and direction
        2 * gates * T * B * H * (I + H); forward+backward 3x. (Models count their own.)"""
        per_unit = 2 * GATES[self.cell] * self.steps * self.batch * self.hidden_size
        total = 0
        for layer in range(self.layers):
            inputs = self.input_size if layer == 0 else self.hidden_size * self.directions
            total += per_unit * (inputs + self.hidden_size) * self.directions
        return total * (3 if self.mode == "forward_backward" else 1)


SUITES = ("quick", "flashrnn", "batch-sweep", "hidden-sweep", "seq-sweep", "short-seq", "cnnlstm",
          "models", "conv2seq")


def _sweep(base: dict, key: str, values, **extra) -> list[dict]:
    shapes = []
    for value in values:
        shape = {**base, key: value, "sweep": key, **extra}
        if key == "hidden_size":
            shape["input_size"] = value  # I = H, as in the published sweeps
        shapes.append(shape)
    return shapes


def shapes(suite: str, device_type: str) -> list[dict]:
    """The shapes (Config fields other than cell, dtype, mode, device) of a suite."""
    if suite == "quick":
        return [QUICK[device_type]]
    if suite == "flashrnn":
        return ([CANONICAL] + _sweep(CANONICAL, "batch", BATCHES)
                + _sweep(CANONICAL, "steps", STEPS) + _sweep(CANONICAL, "hidden_size", HEAD_SIZES))
    base = SWEEP_BASE[device_type]
    if suite == "batch-sweep":
        return _sweep(base, "batch", BATCHES)
    if suite == "hidden-sweep":
        return _sweep(base, "hidden_size", HIDDENS)
    if suite == "seq-sweep":
        return _sweep(base, "steps", STEPS)
    if suite == "short-seq":
        return [shape for batch in (1, 16) for model in ("", CELL_LOOP)
                for shape in _sweep(dict(SHORT_BASE[device_type], batch=batch, model=model),
                                    "steps", SHORT_STEPS)]
    if suite == "cnnlstm":
        return [dict(m, layers=2, directions=2) for m in MODELS[device_type]]
    if suite == "models":  # whole models at published shapes (zoo.py), swapped vs torch.nn
        from . import zoo

        return [dict(shape) for shape in zoo.SHAPES[device_type]]
    if suite == "conv2seq":  # ConvToSequence against the plain ops (conv2seq.py): its own configs
        from . import conv2seq

        return conv2seq.shapes(device_type)
    raise ValueError(f"suite must be one of {SUITES}, got {suite!r}")


def make_configs(shape_list: list[dict], cells, dtypes, modes, device: str) -> list[Config]:
    """Every shape x cell x dtype x mode, duplicates (sweeps meeting at the base) once."""
    configs = []
    for shape in shape_list:
        for cell in cells:
            for dtype in dtypes:
                for mode in modes:
                    cfg = Config(cell=cell, dtype=dtype, mode=mode, device=device, **shape)
                    if all(dataclasses.replace(c, sweep="") != dataclasses.replace(cfg, sweep="")
                           for c in configs):
                        configs.append(cfg)
    return configs


_CONFIG_KEYS = {"B": "batch", "T": "steps", "I": "input_size", "H": "hidden_size",
                "layers": "layers", "directions": "directions"}


def parse_config(text: str) -> dict:
    """``"B=16,T=32,I=128,H=128[,layers=2,directions=2]"`` -> a shape dict."""
    shape = dict(layers=1, directions=1)
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in _CONFIG_KEYS or not value.strip().isdigit():
            raise ValueError(f"--config items must be KEY=INT with KEY in {list(_CONFIG_KEYS)}, got {item!r}")
        shape[_CONFIG_KEYS[key.strip()]] = int(value)
    missing = [k for k, v in _CONFIG_KEYS.items() if v not in shape]
    if missing:
        raise ValueError(f"--config needs {missing}, got {text!r}")
    if shape["directions"] not in (1, 2) or min(shape.values()) < 1:
        raise ValueError(f"--config sizes must be >= 1 and directions 1 or 2, got {text!r}")
    return shape
