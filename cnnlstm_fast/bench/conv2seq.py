"""The ``conv2seq`` bench suite: :class:`cnnlstm_fast.ConvToSequence` against the plain
ops it replaces, around the same recurrent layer.

A CNN-LSTM hands its convolution's raw output x, (B, C, T) or (B, C, H', W), to the
recurrent stack through a norm, an activation, a reduction over H' and a permute. The
plain ops write each intermediate, and the first layer's input projection reads the
sequence back once per direction; ConvToSequence computes G_x of every direction from x
in one pass (``cnnlstm_fast.ops.conv2seq``). Per workload (:data:`WORKLOADS`) and mode:

- ``segment``: x -> the first layer's G_x of every direction, inference. Plain: norm
  (eval), activation, reduction and permute in PyTorch ops, then per direction the input
  projection the layer runs: ``F.linear`` for torch.nn, the device backend's
  ``input_projection`` for ours (on CPU ``cnnlstm_fast::linear``, or for a strided view
  such as this permuted sequence the conv-to-sequence projection with no norm). Fused:
  what the block runs per call: the directions' weights stacked, ``fold_norm``,
  ``projection``.
- ``forward``: x -> the rnn's output, eval, no grad.
- ``forward_backward``: training mode (batch statistics), the gradients of x and of
  every parameter for a fixed cotangent of the output.

Providers: ``torch.nn``, the plain ops around torch.nn's layer (the baseline of
``speedup``); ``plain``, the same ops around ours (backend "auto"); ``fused``,
ConvToSequence around that same module. Where auto leaves a configuration to torch.nn,
the block runs the plain composition, so there ``plain pinned`` and ``fused pinned`` (the
device's backend named) time the fused path as well. ``plain compiled`` and ``fused
compiled``: torch.compile (:data:`COMPILE_BACKEND`, ``allow_rnn``) of the plain ops and
of the block around the layer that runs ours, on the workloads marked ``compile``. A
fused row's ``vs_plain`` is its speedup over its plain counterpart in the same run.

Segment rows also carry the bytes the path moves against the ideal |x| + |G_x|
(:func:`segment_bytes`) and ``copies``, the sequence-sized copies the profiler saw;
compiled rows ``graphs``, the Dynamo graphs of the first call (above 1: graph breaks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import cnnlstm_fast

from ..backends import get_backend
from ..nn.rnn import _split_bias
from ..ops import conv2seq as ops
from . import providers as prov
from . import timing
from .suites import DTYPES_TORCH, GATES
from .suites import Config as LayerConfig

BASELINE = prov.BASELINE
PLAIN, FUSED = "plain", "fused"
PLAIN_PINNED, FUSED_PINNED = "plain pinned", "fused pinned"
PLAIN_COMPILED, FUSED_COMPILED = "plain compiled", "fused compiled"
PROVIDERS = (BASELINE, PLAIN, FUSED, PLAIN_PINNED, FUSED_PINNED, PLAIN_COMPILED, FUSED_COMPILED)
#: Each fused provider's plain counterpart (``vs_plain``).
PLAIN_OF = {FUSED: PLAIN, FUSED_PINNED: PLAIN_PINNED, FUSED_COMPILED: PLAIN_COMPILED}
MODES = ("segment", "forward", "forward_backward")
#: torch.compile's backend for the compiled providers: inductor compiles this suite's
#: graphs in ~10 s each on a 2-core CPU (the recurrence stays one op of ours).
COMPILE_BACKEND = "inductor"


@dataclasses.dataclass(frozen=True)
class Workload:
    """A conv -> rnn hand-off at a published shape. The conv workloads go through
    BatchNorm (1d, or 2d over a map) and relu, a map reduced over H' by max; the
    ``features`` control hands per-frame features (B, T, C) over as they are."""

    model: str
    cell: str
    batch: int
    channels: int  # C: the conv's output channels, the rnn's input size
    steps: int  # T, or W of a map
    hidden_size: int
    layers: int
    directions: int = 1
    height: int = 0  # H' of a (B, C, H', W) map; 0: x is (B, C, T)
    batch_first: bool = False
    features: bool = False  # the control: x = features.transpose(1, 2), no norm or activation
    compile: bool = False  # also timed under torch.compile

    @property
    def norm(self) -> bool:
        return not self.features

    @property
    def activation(self) -> str | None:
        return None if self.features else "relu"

    @property
    def reduce(self) -> str | None:
        return "max" if self.height else None

    @property
    def shape(self) -> str:
        height = f" H'{self.height}" if self.height else ""
        return (f"B{self.batch} C{self.channels}{height} T{self.steps} H{self.hidden_size} "
                f"L{self.layers} D{self.directions}")


#: DeepConvLSTM (Ordonez and Roggen, 2016): 64 conv filters over 128 steps, a 2-layer
#: LSTM (128), time-major. CRNN (Shi et al., 2016): the last conv map (C 256 or 512,
#: height 1 or 2, width 26 or 100) reduced over its height, a 2-layer BiLSTM (256); each
#: value of C, H' and W paired once with each value of the others. DeepSpeech2-like: the
#: conv stack's 32 x 41 outputs per step as 1312 features, T=400, a 2-layer BiGRU (256).
#: LRCN-like (the control): pooled per-frame features, a batch_first LSTM (256).
WORKLOADS = (
    Workload("deepconvlstm", "lstm", 64, 64, 128, 128, 2, compile=True),
    Workload("deepconvlstm", "lstm", 8, 64, 128, 128, 2),
    Workload("crnn", "lstm", 32, 256, 26, 256, 2, directions=2, height=1),
    Workload("crnn", "lstm", 32, 256, 100, 256, 2, directions=2, height=2, compile=True),
    Workload("crnn", "lstm", 32, 512, 100, 256, 2, directions=2, height=1),
    Workload("crnn", "lstm", 32, 512, 26, 256, 2, directions=2, height=2),
    Workload("deepspeech2", "gru", 16, 1312, 400, 256, 2, directions=2),
    Workload("lrcn", "lstm", 16, 512, 16, 256, 1, batch_first=True, features=True, compile=True),
)

#: What the JSON's notes say about how the columns were made.
METHOD_NOTES = (
    "conv2seq: plain = BatchNorm (eval; train in forward_backward) -> relu -> amax over H' "
    "-> permute -> the rnn, one op after another; fused = cnnlstm_fast.ConvToSequence around "
    "the same rnn object. torch.nn: the plain ops around torch.nn's layer. pinned: ours with "
    "the device's backend named, timed where auto leaves the config to torch.nn (the block "
    "then runs the plain composition). vs_plain: the fused row's speedup over its plain "
    "counterpart in the same run.",
    "conv2seq segment: raw conv output -> the first layer's G_x of every direction, "
    "inference. torch.nn: the plain ops then F.linear per direction; plain: the plain ops "
    "then the device backend's input_projection per direction (the cpu backend: "
    "cnnlstm_fast::linear, or the conv-to-sequence projection for a strided view); fused: "
    "the directions' weights stacked, fold_norm, projection (what ConvToSequence runs per "
    "call).",
    "conv2seq bytes (segment rows): activations only, counted from the ops, each operand "
    "streamed through memory once: BatchNorm reads x and writes it, relu reads and writes "
    "it, amax reads x and writes the sequence, every copy the profiler saw of at least "
    "|sequence| elements (copies) reads and writes it, each direction's projection reads "
    "the sequence, and G_x is written once; fused: x read once, G_x written once (its "
    "K blocks of 256 channels revisit a task's <= 96-row tile of G_x, left to cache). "
    "The weights (read and packed per call by both; the block also stacks the directions') "
    "are not counted. ideal = |x| + |G_x|.",
    f"conv2seq compiled: torch.compile(backend={COMPILE_BACKEND!r}, dynamic=False) under "
    "torch._dynamo.config.patch(allow_rnn=True), Dynamo's caches reset per configuration; "
    "graphs: the Dynamo graphs its first call made (above 1: graph breaks).",
)


@dataclasses.dataclass(frozen=True)
class Config:
    workload: Workload
    dtype: str = "float32"
    mode: str = "forward"
    device: str = "cpu"

    @property
    def name(self) -> str:
        w = self.workload
        return f"{w.model}-{w.cell} {w.shape} {self.dtype} {self.mode}"

    @property
    def flops(self) -> int:
        """Matmul FLOPs: the first layer's input projection for a segment, else the
        recurrent layers' (suites.Config.flops, 3x for forward+backward)."""
        w = self.workload
        if self.mode == "segment":
            return 2 * w.steps * w.batch * w.channels * w.directions * GATES[w.cell] * w.hidden_size
        return LayerConfig(w.cell, w.batch, w.steps, w.channels, w.hidden_size, w.layers,
                           w.directions, mode=self.mode).flops


def shapes(device_type: str) -> list[dict]:
    """The suite's workloads as dicts (``suites.shapes``)."""
    return [dataclasses.asdict(w) for w in WORKLOADS]


def make_configs(shape_list: list[dict], cells, dtypes, modes, device: str) -> list[Config]:
    """Every workload of one of ``cells`` x dtype x mode: the segment always, then the
    modes asked for."""
    workloads = [Workload(**shape) for shape in shape_list if shape["cell"] in cells]
    return [Config(w, dtype, mode, device) for w in workloads for dtype in dtypes
            for mode in MODES if mode == "segment" or mode in modes]


# --- the modules -------------------------------------------------------------------------

class PlainFrontEnd(nn.Module):
    """norm -> activation -> reduce over H' -> the rnn's layout -> rnn, one op after
    another: what a model without ConvToSequence runs."""

    def __init__(self, rnn: nn.Module, norm: nn.Module | None, activation, reduce):
        super().__init__()
        self.rnn, self.norm, self.activation, self.reduce = rnn, norm, activation, reduce

    def forward(self, x):
        seq = ops.reference_sequence(x, self.norm, self.activation, self.reduce)
        return self.rnn(seq.transpose(1, 2) if self.rnn.batch_first else seq.permute(2, 0, 1))


def device_backend(device: str) -> str:
    """Our backend for ``device``'s type: what ``pinned`` names."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


@dataclasses.dataclass
class Built:
    """One configuration's input and modules, on the same weights and one norm object,
    and the backend auto picked (None for the segment, which has no recurrence)."""

    x: torch.Tensor  # (B, C, T) or (B, C, H', W); the control's is a transposed view
    theirs: PlainFrontEnd
    plain: PlainFrontEnd  # ours, backend auto
    block: cnnlstm_fast.ConvToSequence  # around plain.rnn
    pinned: Callable[[], tuple[PlainFrontEnd, cnnlstm_fast.ConvToSequence]]  # new, named backend
    auto_pick: str | None = None


def raw_input(w: Workload, device: str, dtype: torch.dtype) -> torch.Tensor:
    """A random conv output of ``w`` (fixed seed); the control's is features (B, T, C)
    transposed to (B, C, T) in place."""
    gen = torch.Generator().manual_seed(0)
    if w.features:
        return torch.randn(w.batch, w.steps, w.channels, generator=gen).to(device, dtype).transpose(1, 2)
    shape = (w.batch, w.channels, w.height, w.steps) if w.height else (w.batch, w.channels, w.steps)
    return torch.randn(shape, generator=gen).to(device, dtype)


def build(cfg: Config) -> Built:
    w, dtype = cfg.workload, DTYPES_TORCH[cfg.dtype]
    torch.manual_seed(0)
    kwargs = dict(num_layers=w.layers, bidirectional=w.directions == 2,
                  batch_first=w.batch_first, device=cfg.device, dtype=dtype)
    torch_cls, our_cls = prov.LAYERS[w.cell]
    theirs_rnn = torch_cls(w.channels, w.hidden_size, **kwargs)
    norm = None
    if w.norm:
        norm = (nn.BatchNorm2d if w.height else nn.BatchNorm1d)(w.channels, device=cfg.device,
                                                                dtype=dtype)
        with torch.no_grad():  # not the identity: a learnt affine and running statistics
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            norm.running_mean.uniform_(-0.3, 0.3)
            norm.running_var.uniform_(0.5, 2.0)

    def ours(backend: str) -> tuple[PlainFrontEnd, cnnlstm_fast.ConvToSequence]:
        rnn = our_cls(w.channels, w.hidden_size, backend=backend, **kwargs)
        rnn.load_state_dict(theirs_rnn.state_dict())
        return (PlainFrontEnd(rnn, norm, w.activation, w.reduce),
                cnnlstm_fast.ConvToSequence(rnn, norm=norm, activation=w.activation,
                                            reduce=w.reduce))

    training = cfg.mode == "forward_backward"

    def pinned() -> tuple[PlainFrontEnd, cnnlstm_fast.ConvToSequence]:
        plain, block = ours(device_backend(cfg.device))
        return plain.train(training), block.train(training)

    plain, block = ours("auto")
    theirs = PlainFrontEnd(theirs_rnn, norm, w.activation, w.reduce)
    for module in (theirs, plain, block):
        module.train(training)
    built = Built(raw_input(w, cfg.device, dtype), theirs, plain, block, pinned)
    if cfg.mode != "segment":
        with prov.auto_choices() as chosen:
            _step(cfg, built, plain, plain)()
        built.auto_pick = "+".join(sorted(set(chosen))) or None
    return built


# --- the steps ---------------------------------------------------------------------------

def _layer0(rnn: nn.Module, direction: int):
    """(w_ih, G_x bias) of the first layer's ``direction``, as the layer folds them."""
    suffix = "_reverse" if direction else ""
    b_ih = getattr(rnn, f"bias_ih_l0{suffix}", None)
    b_hh = getattr(rnn, f"bias_hh_l0{suffix}", None)
    cell = "gru" if rnn.mode == "GRU" else "lstm"
    return getattr(rnn, f"weight_ih_l0{suffix}"), _split_bias(cell, b_ih, b_hh, rnn.hidden_size)[0]


def plain_segment(front: PlainFrontEnd, projection) -> Callable:
    """x -> [G_x of each direction]: the plain ops, then ``projection(seq, w, b)`` per
    direction on the time-major sequence (the layer transposes a batch_first input)."""
    directions = 2 if front.rnn.bidirectional else 1

    def segment(x):
        seq = ops.reference_sequence(x, front.norm, front.activation, front.reduce).permute(2, 0, 1)
        return [projection(seq, *_layer0(front.rnn, d)) for d in range(directions)]

    return segment


def fused_segment(block: cnnlstm_fast.ConvToSequence) -> Callable:
    """x -> G_x of every direction, as ``projection`` gives it: what ConvToSequence's
    fused path runs before the recurrence."""
    rnn = block.rnn
    directions = 2 if rnn.bidirectional else 1

    def segment(x):
        weights, biases = zip(*(_layer0(rnn, d) for d in range(directions)))
        w_ih = weights[0] if directions == 1 else torch.cat(weights)
        bias = biases[0] if directions == 1 or biases[0] is None else torch.cat(biases)
        scale, shift = ops.fold_norm(block.norm, x)
        return ops.projection(x, scale, shift, block.activation, block.reduce, w_ih, bias,
                              directions)

    return segment


def _compiled(fn: Callable) -> Callable:
    """torch.compile of ``fn`` with static shapes, called with Dynamo's allow_rnn (without
    it Dynamo breaks the graph at every LSTM/GRU module, torch.nn's and ours)."""
    compiled = torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False)

    def call(*args):
        with torch._dynamo.config.patch(allow_rnn=True):
            return compiled(*args)

    return call


def _step(cfg: Config, built: Built, fn: Callable, module: nn.Module | None) -> Callable[[], None]:
    """One repetition of ``cfg.mode`` on ``fn`` (segment and forward: no grad; training:
    the gradients of x and of ``module``'s parameters)."""
    if cfg.mode != "forward_backward":

        def forward():
            with torch.no_grad():
                fn(built.x)

        return forward
    w = cfg.workload
    transposed = w.features  # x is a view of (B, T, C) features: their gradient
    leaf = (built.x.transpose(1, 2) if transposed else built.x).detach().requires_grad_()
    params = list(module.parameters())
    out_shape = ((w.batch, w.steps) if w.batch_first else (w.steps, w.batch)) + (
        w.directions * w.hidden_size,)
    dy = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(built.x)

    def forward_backward():
        out = fn(leaf.transpose(1, 2) if transposed else leaf)[0]
        torch.autograd.grad(out, [leaf, *params], dy)

    return forward_backward


def provider_fn(cfg: Config, built: Built, provider: str) -> tuple[Callable, nn.Module | None]:
    """(the function ``provider`` times on ``cfg``, x -> G_x or x -> the rnn's output;
    the module whose parameters it trains, None for the segment); raises
    :class:`providers.Skip` where the provider does not apply."""
    w = cfg.workload
    ours = device_backend(cfg.device)
    compiled = provider in (PLAIN_COMPILED, FUSED_COMPILED)
    if compiled and not w.compile:
        raise prov.Skip("not compiled at this workload (Workload.compile; compiling takes "
                        "~10 s a graph)")
    if cfg.mode == "segment":
        if provider in (PLAIN_PINNED, FUSED_PINNED):
            raise prov.Skip("segment: no recurrence, so no backend to pin")
        if provider == BASELINE:
            return plain_segment(built.theirs, F.linear), None
        if ours not in cnnlstm_fast.available_backends():
            raise prov.Skip(f"backend {ours!r} is not available here")
        if provider in (PLAIN, PLAIN_COMPILED):
            fn = plain_segment(built.plain, get_backend(ours).input_projection)
        else:
            fn = fused_segment(built.block)
        return (_compiled(fn) if compiled else fn), None
    if provider in (BASELINE, PLAIN, FUSED):
        module = {BASELINE: built.theirs, PLAIN: built.plain, FUSED: built.block}[provider]
        return module, module
    runs_ours = built.auto_pick == ours
    if provider in (PLAIN_PINNED, FUSED_PINNED) and runs_ours:
        raise prov.Skip(f"auto runs {ours} here: the plain and fused rows are these")
    if not runs_ours and ours not in cnnlstm_fast.available_backends():
        raise prov.Skip(f"backend {ours!r} is not available here")
    # the pinned and compiled rows run ours: the auto modules where auto picks it
    plain, block = (built.plain, built.block) if runs_ours else built.pinned()
    module = plain if provider in (PLAIN_PINNED, PLAIN_COMPILED) else block
    return (_compiled(module) if compiled else module), module


# --- what the segment moves ----------------------------------------------------------------

def sequence_copies(fn: Callable, x: torch.Tensor, at_least: int) -> list[int]:
    """Element counts of the ``aten::copy_`` calls of at least ``at_least`` elements in
    one no-grad call of ``fn(x)``, from torch.profiler (with shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn(x)
    sizes = []
    for event in prof.events():
        if event.name == "aten::copy_" and event.input_shapes and event.input_shapes[0]:
            numel = 1
            for n in event.input_shapes[0]:
                numel *= n
            if numel >= at_least:
                sizes.append(numel)
    return sizes


def segment_bytes(w: Workload, fused: bool, copies: list[int], element_size: int) -> dict:
    """Activation bytes the segment moves (see :data:`METHOD_NOTES`) and the ideal."""
    x = w.batch * w.channels * max(w.height, 1) * w.steps
    seq = w.batch * w.channels * w.steps
    gx = w.directions * w.steps * w.batch * GATES[w.cell] * w.hidden_size
    if fused:
        moved = x + gx
    else:
        moved = (2 * x if w.norm else 0) + (2 * x if w.activation else 0)
        moved += x + seq if w.reduce else 0
        moved += 2 * sum(copies) + w.directions * seq + gx
    ideal = x + gx
    return {"bytes": moved * element_size, "ideal_bytes": ideal * element_size,
            "x_ideal": moved / ideal}


# --- one configuration -----------------------------------------------------------------------

def config_steps(cfg: Config, providers: list[str]) -> tuple[dict, dict, dict, dict]:
    """(provider -> step, provider -> skip reason, provider -> backend picked, provider ->
    extra row fields: a segment's bytes, a compiled provider's graph count) on ``cfg``;
    each step has run once (compiled, warmed up)."""
    from torch._dynamo.utils import counters

    if cfg.workload.compile and {PLAIN_COMPILED, FUSED_COMPILED} & set(providers):
        torch._dynamo.reset()  # fresh caches: each config recompiles, never past the limit
    built = build(cfg)
    ours = device_backend(cfg.device)
    steps, skipped, picked, extra = {}, {}, {}, {}
    for provider in providers:
        try:
            fn, module = provider_fn(cfg, built, provider)
            step = _step(cfg, built, fn, module)
            graphs = counters["stats"]["unique_graphs"]
            with prov.auto_choices() as chosen:
                step()
            graphs = counters["stats"]["unique_graphs"] - graphs
        except prov.Skip as why:
            skipped[provider] = str(why)
            continue
        except Exception as error:  # a backend's "cannot run this input", an OOM, ...
            first = str(error).splitlines()[0] if str(error) else ""
            skipped[provider] = f"{type(error).__name__}: {first}"
            continue
        steps[provider] = step
        extra[provider] = {"graphs": graphs if provider in (PLAIN_COMPILED, FUSED_COMPILED) else None}
        if cfg.mode != "segment" and provider != BASELINE:
            picked[provider] = (built.auto_pick if provider in (PLAIN, FUSED)
                                else "+".join(sorted(set(chosen))) or ours)
        if cfg.mode == "segment" and provider in (BASELINE, PLAIN, FUSED):  # eager only
            w = cfg.workload
            copies = sequence_copies(fn, built.x, w.batch * w.channels * w.steps)
            extra[provider].update(segment_bytes(w, provider == FUSED, copies,
                                                 built.x.element_size()), copies=len(copies))
    return steps, skipped, picked, extra


def run_config(cfg: Config, providers: list[str], reps: int, peaks: dict,
               budget_s: float) -> tuple[list[dict], list[dict]]:
    """Times every provider on ``cfg``, interleaved: (result rows, skipped providers)."""
    steps, skipped, picked, extra = config_steps(cfg, providers)
    skips = [{"config": cfg.name, "provider": p, "reason": r} for p, r in skipped.items()]
    if not steps:
        return [], skips
    if cfg.device.startswith("cuda"):
        timings = timing.time_cuda(steps, reps)
    else:
        timings = timing.time_cpu(steps, reps, budget_s)
    return _rows(cfg, timings, picked, extra, peaks[cfg.dtype]), skips


def _rows(cfg: Config, timings: dict, picked: dict, extra: dict, peak: float) -> list[dict]:
    w = cfg.workload
    base = timings.get(BASELINE, {}).get("median_ms")
    flops = cfg.flops
    rows = []
    for provider, t in timings.items():
        plain = timings.get(PLAIN_OF.get(provider), {}).get("median_ms")
        tflops = flops / (t["median_ms"] * 1e-3) / 1e12
        rows.append({
            "suite": "conv2seq", "config": cfg.name, "cell": w.cell, "batch": w.batch,
            "steps": w.steps, "input_size": w.channels, "hidden_size": w.hidden_size,
            "layers": w.layers, "directions": w.directions, "dtype": cfg.dtype,
            "mode": cfg.mode, "device": cfg.device, "model": w.model, "sweep": "",
            "height": w.height, "norm": w.norm, "activation": w.activation, "reduce": w.reduce,
            "provider": provider, "picked": picked.get(provider),
            "compile_backend": COMPILE_BACKEND if provider in (PLAIN_COMPILED, FUSED_COMPILED) else None,
            "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
            "reps": t.get("reps"),
            "speedup": None if base is None else base / t["median_ms"],
            "vs_plain": None if plain is None else plain / t["median_ms"],
            "us_per_step": t["median_ms"] * 1e3 / w.steps,
            "floor_us_per_step": None, "x_floor": None,
            "flops": flops, "tflops": tflops, "pct_peak": 100 * tflops / peak,
            "peak_mib": t.get("peak_mib"),
            "bytes": None, "ideal_bytes": None, "x_ideal": None, "copies": None,
            **extra[provider],
        })
    return rows


def slower_notes(rows: list[dict]) -> list[str]:
    """The configurations where a fused row measured slower than its plain counterpart
    with the two p20-p80 ranges apart (the suite's bar: never slower)."""
    by_key = {(r["config"], r["provider"]): r for r in rows}
    slower = []
    for row in rows:
        plain = by_key.get((row["config"], PLAIN_OF.get(row["provider"])))
        if plain is not None and row["p20_ms"] > plain["p80_ms"]:
            slower.append(f"{row['config']} {row['provider']} ({row['vs_plain']:.2f}x)")
    if not slower:
        return []
    return [f"fused slower than plain beyond the p20-p80 spread in {len(slower)} row(s): "
            + "; ".join(slower)]


def print_summary(rows: list[dict]) -> None:
    """Per configuration: each fused provider against its plain counterpart, and the
    segment's bytes against the ideal."""
    from rich.table import Table

    from .report import _console

    by_key = {(r["config"], r["provider"]): r for r in rows}

    def cell(config: str, provider: str, key: str, fmt: str) -> str:
        value = (by_key.get((config, provider)) or {}).get(key)
        return "-" if value is None else fmt.format(value)

    table = Table(title="conv2seq: fused vs plain (median; above 1x the fused path is faster)")
    for header in ("configuration", "torch.nn ms", "plain ms", "picked", "fused", "fused pinned",
                   "fused compiled", "bytes/ideal: plain", "fused"):
        table.add_column(header, justify="right")
    for config in dict.fromkeys(r["config"] for r in rows):
        table.add_row(config, cell(config, BASELINE, "median_ms", "{:.3f}"),
                      cell(config, PLAIN, "median_ms", "{:.3f}"), cell(config, PLAIN, "picked", "{}"),
                      *(cell(config, p, "vs_plain", "{:.2f}x")
                        for p in (FUSED, FUSED_PINNED, FUSED_COMPILED)),
                      *(cell(config, p, "x_ideal", "{:.2f}x") for p in (PLAIN, FUSED)))
    _console().print(table)
