"""The DALI graph: decode one sample's images and build every view the recipe asks for.

Design (why the random numbers come from Python): every random choice of a view (crop window,
flip, colour-jitter factors, grayscale, blur sigma) is drawn on the host by ``sample_params``
from a generator seeded by (run seed, DP rank, epoch, position in the epoch), and handed to the
graph as per-sample *argument inputs* through ``fn.external_source``. DALI's own RNG is never
used. So a sample's views are a pure function of its position in the stream, not of which
batch it landed in or how many pipeline runs preceded it, which gives:

- exact resume without DALI pipeline checkpointing (the loader position is two integers);
- identical batches on every TP rank and on every pipeline stage that builds the loader;
- harmless pipeline rebuilds: a corrupt JPEG makes DALI's decoder raise and invalidates the
  pipeline ("Current pipeline object is no longer valid", measured with DALI 2.4), so the
  loader rebuilds it, drops the bad sample and re-runs the batch: outputs are unchanged.

The graph is the same on CPU and GPU; only the decoder's device differs: ``"mixed"`` (nvJPEG /
the hardware JPEG decoder, then every op on the GPU) when ``use_cuda()`` says a GPU is used,
``"cpu"`` otherwise. Per-view layout of the parameter row (``PARAMS`` columns):
``y0, x0, y1, x1`` (relative crop window), ``mirror``, ``brightness, contrast, saturation,
hue`` (hue in degrees, DALI's unit), ``sigma`` (Gaussian blur), ``colour_on``, ``blur_on``.
The two flags drive DALI conditionals (``enable_conditionals``): colour and blur ops run only
on the samples that drew them (as torchvision's RandomApply does), which is what makes the CPU
pipeline faster than PIL rather than paying every op for every crop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from tulip_mega.data.base import IMAGE_MEAN, IMAGE_STD
from tulip_mega.data.eda import EdaConfig

__all__ = ["PARAMS", "ViewPlan", "build_pipeline", "dali_available", "rrc_window", "sample_params", "to_torch"]

PARAMS = ("y0", "x0", "y1", "x1", "mirror", "brightness", "contrast", "saturation", "hue", "sigma",
          "colour_on", "blur_on")
_NO_BLUR = 1e-3  # DALI refuses sigma == 0; at 1e-3 the kernel is [0, 1, 0] in float32
_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of random-resized crops (torchvision)


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports (the ``dali`` extra is installed)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ViewPlan:
    """Everything the loader emits per sample: its views, GeCo fields and EDA copy (the trainer
    builds it from the recipe and its input streams: ``tulip_mega.training.data.view_plan``)."""

    image_size: int
    crops: int = 0  # extra global crops after view 0
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    edits: bool = False
    first_view_crop: bool = False
    flip_prob: float = 0.5
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    paraphrases: int = 0
    negatives: int = 0
    eda: bool = False
    eda_config: EdaConfig = field(default_factory=EdaConfig)
    regions: int = 0  # region captions and boxes per sample from the json (LocCa); view 0 is not cropped

    def fields(self) -> tuple[str, ...]:
        """The ``Batch`` fields a loader must fill for this plan (the others stay None)."""
        out = ["images", "tokens", "keys"]
        out += ["crops"] if self.crops else []
        out += ["local_crops"] if self.local_crops else []
        out += ["edits", "edit_valid"] if self.edits else []
        out += ["paraphrases", "paraphrase_valid"] if self.paraphrases else []
        out += ["negatives", "negative_valid"] if self.negatives else []
        out += ["eda_tokens"] if self.eda else []
        out += ["region_tokens", "region_boxes", "region_valid"] if self.regions else []
        return tuple(out)

    @property
    def num_views(self) -> int:
        """Rows of the parameter matrix: view 0, global crops, local crops."""
        return 1 + self.crops + self.local_crops

    @property
    def uses_params(self) -> bool:
        """False when every view is a plain resize (DALI then prunes the "params" input)."""
        return self.first_view_crop or self.crops > 0 or self.local_crops > 0

    @property
    def needs_json(self) -> bool:
        return self.paraphrases > 0 or self.negatives > 0 or self.regions > 0

    @property
    def photometric(self) -> bool:
        """Whether colour ops are in the graph at all (skipped when every probability is 0)."""
        return self.color_jitter_prob > 0 or self.grayscale_prob > 0


def rrc_window(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w) in pixels.

    Ten tries of area in ``scale`` x aspect ratio log-uniform in [3/4, 4/3]; falls back to the
    largest centred crop with a clamped aspect ratio, exactly like torchvision.
    """
    area = width * height
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < _RATIO[0]:
        w, h = width, int(round(width / _RATIO[0]))
    elif in_ratio > _RATIO[1]:
        h, w = height, int(round(height * _RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _crop_row(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
              size: int, plan: ViewPlan, photometric: bool) -> list[float]:
    top, left, h, w = rrc_window(rng, width, height, scale)
    # Always draw every number, so changing a probability never shifts later draws.
    u = rng.uniform(size=6)
    jb, jc, js, jh = plan.color_jitter
    b = rng.uniform(max(0.0, 1 - jb), 1 + jb)
    c = rng.uniform(max(0.0, 1 - jc), 1 + jc)
    s = rng.uniform(max(0.0, 1 - js), 1 + js)
    hue = rng.uniform(-jh, jh) * 360.0
    sigma = rng.uniform(0.1, 2.0) * size / 224.0  # DINO's [0.1, 2] at 224 px, scaled to the view
    mirror = float(u[0] < plan.flip_prob)
    if not photometric:
        return [top / height, left / width, (top + h) / height, (left + w) / width, mirror, 1, 1, 1, 0, _NO_BLUR, 0, 0]
    jitter, gray, blur = u[1] < plan.color_jitter_prob, u[2] < plan.grayscale_prob, u[3] < plan.blur_prob
    if not jitter:
        b, c, s, hue = 1.0, 1.0, 1.0, 0.0
    if gray:
        s = 0.0
    sigma = max(sigma, _NO_BLUR) if blur else _NO_BLUR
    return [top / height, left / width, (top + h) / height, (left + w) / width, mirror, b, c, s, hue, sigma,
            float(jitter or gray), float(blur)]


def sample_params(rng: np.random.Generator, width: int, height: int, plan: ViewPlan) -> np.ndarray:
    """float32 [plan.num_views, len(PARAMS)]: view 0, then global crops, then local crops."""
    rows = []
    if plan.first_view_crop:
        rows.append(_crop_row(rng, width, height, plan.global_scale, plan.image_size, plan, photometric=False))
    else:
        rows.append([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, _NO_BLUR, 0.0, 0.0])
    for _ in range(plan.crops):
        rows.append(_crop_row(rng, width, height, plan.global_scale, plan.image_size, plan, photometric=True))
    for _ in range(plan.local_crops):
        rows.append(_crop_row(rng, width, height, plan.local_scale, plan.local_size, plan, photometric=True))
    return np.asarray(rows, dtype=np.float32)


def build_pipeline(plan: ViewPlan, batch_size: int, num_threads: int, gpu: bool, device_id: int | None = None):
    """A built DALI pipeline fed through ``feed_input``: "jpg", "params" (+ "pos", "neg").

    Outputs, float32 normalised with IMAGE_MEAN/IMAGE_STD: view 0 [B, 3, S, S], then when
    present the global crops [B, G-1, 3, S, S], the local crops [B, n, 3, s, s] and the edits
    [B, 2, 3, S, S] (pos, neg resized like view 0).
    Non-pipelined execution: the loader feeds exactly the samples of one batch and must know
    which run failed, so nothing is queued ahead (DALI still uses ``num_threads`` per batch).
    """
    from nvidia.dali import fn, pipeline_def, types

    mean = [255.0 * m for m in IMAGE_MEAN]
    std = [255.0 * s for s in IMAGE_STD]
    decode_device = "mixed" if gpu else "cpu"

    def finish(img, mirror=0):
        return fn.crop_mirror_normalize(img, mirror=mirror, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")

    def view(img, p, size: int, photometric: bool, blur: bool):
        out = fn.resize(img, size=[size, size], roi_start=p[0:2], roi_end=p[2:4], roi_relative=True,
                        interp_type=types.INTERP_LINEAR, antialias=True)
        if photometric:
            if p[10] > 0.5:  # DALI conditional: only the samples that drew colour jitter / grayscale
                out = fn.color_twist(out, brightness=p[5], contrast=p[6], saturation=p[7], hue=p[8])
        if blur:
            if p[11] > 0.5:
                out = fn.gaussian_blur(out, sigma=p[9])
        return finish(out, fn.cast(p[4], dtype=types.INT32))

    def plain(img):
        return finish(fn.resize(img, size=[plan.image_size] * 2, interp_type=types.INTERP_LINEAR, antialias=True))

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpg = fn.external_source(name="jpg", dtype=types.UINT8, ndim=1)
        params = fn.external_source(name="params", dtype=types.FLOAT, ndim=2)
        img = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
        outs = [view(img, params[0], plan.image_size, False, False) if plan.first_view_crop else plain(img)]
        blur = plan.blur_prob > 0
        if plan.crops:  # one stacked output per group: [B, views, 3, S, S] without a host-side stack
            outs.append(fn.stack(*[view(img, params[1 + i], plan.image_size, plan.photometric, blur)
                                   for i in range(plan.crops)], axis=0))
        if plan.local_crops:
            outs.append(fn.stack(*[view(img, params[1 + plan.crops + i], plan.local_size, plan.photometric, blur)
                                   for i in range(plan.local_crops)], axis=0))
        if plan.edits:
            edits = [plain(fn.decoders.image(fn.external_source(name=name, dtype=types.UINT8, ndim=1),
                                             device=decode_device, output_type=types.RGB)) for name in ("pos", "neg")]
            outs.append(fn.stack(*edits, axis=0))
        return tuple(outs)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id if gpu else None,
                 exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
    pipe.build()
    return pipe


def to_torch(tensor_list, device_id: int | None = None) -> torch.Tensor:
    """A dense DALI TensorList (CPU or GPU) -> a torch tensor on the same device (a copy).

    GPU outputs are copied on the current stream, which is then synchronised: the loader calls
    this from its prefetch thread, and the training step must find finished tensors."""
    from nvidia.dali.backend import TensorListCPU

    if isinstance(tensor_list, TensorListCPU):
        # One copy out of DALI's buffer (reused by the next run); measured faster than as_array().
        return torch.from_numpy(np.array(np.asarray(tensor_list.as_tensor()), copy=True))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    device = torch.device("cuda", torch.cuda.current_device() if device_id is None else device_id)
    out = torch.empty(tuple(dense.shape()), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device)
    feed_ndarray(dense, out, cuda_stream=stream)
    stream.synchronize()
    return out
