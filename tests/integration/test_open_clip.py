"""open_clip export / import.

One module-scoped run: a random debug-size TULIP model written as an open_clip folder is
loaded with `model.init_from_open_clip` under TP=2 x PP=2 (4 gloo ranks) and saved; that
checkpoint is exported back with `tulip-mega convert --to open_clip` (and `--to pytorch`,
our reference). Stock `open_clip` + `timm` then load the export through their public API.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("transformers")

import open_clip  # noqa: E402

from harness import make_cfg  # noqa: E402
from tulip_mega.convert.common import ConversionError  # noqa: E402
from tulip_mega.convert.openclip import (  # noqa: E402
    CONFIG_FILE, WEIGHTS_FILE, import_open_clip, load_open_clip_state, open_clip_model_config,
    plain_config_from_open_clip, plain_to_open_clip)
from tulip_mega.convert.plain_model import PlainConfig, TulipPlainModel  # noqa: E402
from tulip_mega.parallel.spawn import run_distributed  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LAYOUT = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "train.global_batch_size=8",
          "train.micro_batch_size=4"]

# The TULIP release configs (TULIP-B-16-224, TULIP-so400m-14-384, TULIP-G-16-384), reconstructed
# from the issue (#17: timm SigLIP towers, MAP pool, no projection; TextTransformer with last-token
# pool, no causal mask, proj bias, tanh GELU, eps 1e-6, context 64; init_logit_bias -15) and
# open_clip's own ViT-B-16-SigLIP / ViT-SO400M-14-SigLIP-384 / ViT-gopt-16-SigLIP2-384 configs.
_TEXT = {"context_length": 64, "vocab_size": 32000, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
         "norm_kwargs": {"eps": 1e-6}, "act_kwargs": {"approximate": "tanh"}}
_SO400M_TEXT = {"width": 1152, "heads": 16, "layers": 27, "mlp_ratio": 3.7362, **_TEXT}
TULIP_RELEASE = {
    "b16": {"embed_dim": 768, "init_logit_bias": -15, "custom_text": True,
            "vision_cfg": {"image_size": 224, "timm_model_name": "vit_base_patch16_siglip_224",
                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {"width": 768, "heads": 12, "layers": 12, **_TEXT}},
    "so400m": {"embed_dim": 1152, "init_logit_bias": -15, "custom_text": True,
               "vision_cfg": {"image_size": 384, "timm_model_name": "vit_so400m_patch14_siglip_384",
                              "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
               "text_cfg": dict(_SO400M_TEXT)},
    "g16": {"embed_dim": 1536, "init_logit_bias": -15, "custom_text": True,
            "vision_cfg": {"image_size": 384, "timm_model_name": "vit_giantopt_patch16_siglip_384",
                           "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": dict(_SO400M_TEXT)},
}
# Differ by design: our tokenizer / vocabulary, and the init-only logit bias.
NOT_COMPARED = {"hf_tokenizer_name", "tokenizer_kwargs", "vocab_size", "init_logit_bias"}


def _plain_cfg(cfg) -> PlainConfig:
    return PlainConfig(vision=dict(vars(cfg.model.vision)), text=dict(vars(cfg.model.text)),
                       layernorm_eps=cfg.model.layernorm_eps)


def _write_open_clip_folder(out: Path, cfg: PlainConfig) -> dict[str, torch.Tensor]:
    """A random TULIP model as an open_clip folder (what a TULIP release folder looks like)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = TulipPlainModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    state = plain_to_open_clip(model.state_dict(), cfg)
    out.mkdir(parents=True)
    save_file(state, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"model_cfg": open_clip_model_config(cfg, "unused")}))
    return state


def import_worker(root: str, source: str) -> str:
    import warnings

    warnings.filterwarnings("ignore")
    from harness import build_train_step
    from tulip_mega.training.checkpoint import save_checkpoint
    from tulip_mega.training.checkpoint import model_shape

    cfg, model, opt, sch, _ = build_train_step(LAYOUT + [f"model.init_from_open_clip={source}"])
    return str(save_checkpoint(Path(root) / "imported", 0, model, opt, sch, None, model_shape(cfg)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    from tulip_mega.data.tokenizer import train_tokenizer
    from tulip_mega.convert.plain import convert_checkpoint
    from tulip_mega.convert.openclip import export_open_clip

    root = tmp_path_factory.mktemp("open_clip")
    cfg = make_cfg(LAYOUT)
    source = _write_open_clip_folder(root / "source", _plain_cfg(cfg))
    checkpoint = run_distributed(import_worker, 4, str(root), str(root / "source"))[0]
    captions = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow")
                for s in ("circle", "square", "star") for b in ("dark", "light")]
    spm_model = train_tokenizer(captions * 4, str(root / "tok"), vocab_size=64)
    export_open_clip(checkpoint, root / "export", tokenizer=spm_model, log=lambda s: None)
    convert_checkpoint(checkpoint, root / "plain", log=lambda s: None)
    return {"root": root, "source": source, "checkpoint": checkpoint, "spm": spm_model, "cfg": cfg}


@pytest.mark.multiprocess
def test_round_trip_open_clip_tp2_pp2_open_clip_is_bit_identical(exported):
    from safetensors.torch import load_file

    back = load_file(str(exported["root"] / "export" / WEIGHTS_FILE))
    source = exported["source"]
    assert set(back) == set(source), set(back) ^ set(source)
    for k, v in source.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.multiprocess
def test_stock_open_clip_loads_export_and_matches_our_embeddings(exported):
    from tulip_mega.data.tokenizer import Tokenizer

    out = exported["root"] / "export"
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    assert type(model).__name__ == "CustomTextCLIP" and type(model.visual).__name__ == "TimmModel"
    ours = TulipPlainModel.from_pretrained(exported["root"] / "plain")
    cfg = exported["cfg"]
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    texts = ["a red circle on a dark background", "A Blue  star", "green square"]
    tokens = tokenizer(texts)
    # open_clip's HFTokenizer (from the exported folder) gives exactly our ids.
    assert tokens.tolist() == Tokenizer(exported["spm"], cfg.model.text.context_length).encode(texts).tolist()
    images = torch.randn(4, 3, cfg.model.vision.image_size, cfg.model.vision.image_size,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
        ref_img, ref_txt = ours.encode_image(images), ours.encode_text(tokens)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
    print(f"open_clip vs ours: image {(img - ref_img).abs().max():.1e}, text {(txt - ref_txt).abs().max():.1e}")
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, ours.similarity(ref_img, ref_txt), rtol=1e-5, atol=1e-4)


FRESH_PROCESS = """
import json, sys
import open_clip, torch
from timm.models._registry import is_model
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + sys.argv[1])
model.eval()
tokens = open_clip.get_tokenizer("local-dir:" + sys.argv[1])(json.loads(sys.argv[2]))
images = torch.load(sys.argv[3])
with torch.no_grad():
    img, txt = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
torch.save({"img": img, "txt": txt, "tokens": tokens, "project": sorted(m for m in sys.modules if m.split(".")[0] == "tulip_mega"),
            "registered": is_model("vit_tulip_debug_patch8_siglip_32"), "act": type(model.visual.trunk.blocks[0].mlp.act).__name__,
            "preprocess": repr(preprocess)}, sys.argv[4])
"""


@pytest.mark.multiprocess
def test_export_loads_in_a_process_that_never_imports_this_project(exported, tmp_path):
    """The debug export's vision tower is a timm config folder (local-dir:), so stock open_clip +
    timm build it with no tulip_mega import and no registered debug model; same embeddings."""
    from tulip_mega.data.tokenizer import Tokenizer

    out = exported["root"] / "export"
    cfg = exported["cfg"]
    side = cfg.model.vision.image_size
    images = torch.randn(3, 3, side, side, generator=torch.Generator().manual_seed(2))
    torch.save(images, tmp_path / "images.pt")
    texts = ["a red circle on a dark background", "green square"]
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    proc = subprocess.run([sys.executable, str(script), str(out), json.dumps(texts), str(tmp_path / "images.pt"),
                           str(tmp_path / "got.pt")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "got.pt")
    assert got["project"] == [] and got["registered"] is False and got["act"] == "GELUTanh"
    assert f"Resize(size=({side}, {side}), interpolation=bicubic" in got["preprocess"]
    ours = TulipPlainModel.from_pretrained(exported["root"] / "plain")
    assert got["tokens"].tolist() == Tokenizer(exported["spm"], cfg.model.text.context_length).encode(texts).tolist()
    with torch.no_grad():
        torch.testing.assert_close(got["img"], ours.encode_image(images), rtol=0, atol=1e-5)
        torch.testing.assert_close(got["txt"], ours.encode_text(got["tokens"]), rtol=0, atol=1e-5)
    # Our importer reads the folder back, also after it was moved (the timm folder is found beside the config).
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(out, moved)
    cfg_moved, _ = load_open_clip_state(moved)
    assert cfg_moved == _plain_cfg(cfg)


@pytest.mark.parametrize("size", sorted(TULIP_RELEASE))
def test_export_config_equals_tulip_release_config(size):
    from tulip_mega.config import load_config

    cfg = load_config(None, [f"model.size={size}"])
    ours = open_clip_model_config(_plain_cfg(cfg), hf_tokenizer_name="tok")
    release = TULIP_RELEASE[size]
    assert set(ours) == set(release)
    for key in release:
        if key in NOT_COMPARED:
            continue
        if isinstance(release[key], dict):
            drop = lambda d: {k: v for k, v in d.items() if k not in NOT_COMPARED}  # noqa: E731
            assert drop(ours[key]) == drop(release[key]), (size, key)
        else:
            assert ours[key] == release[key], (size, key)
    # ...and the release config reads back as the same architecture.
    assert plain_config_from_open_clip(release) == _plain_cfg(cfg)


def test_init_from_open_clip_checks_the_recipe(tmp_path):
    cfg = make_cfg([])
    _write_open_clip_folder(tmp_path / "oc", _plain_cfg(cfg))
    with pytest.raises(ConversionError, match=r"model.init_from_open_clip: .*\n  model.text.num_layers: .* has 2, "
                                              r"the recipe 4"):
        import_open_clip(tmp_path / "oc", make_cfg(["model.text.num_layers=4"]).model)
    (tmp_path / "oc" / WEIGHTS_FILE).unlink()
    with pytest.raises(ConversionError, match=f"has neither {WEIGHTS_FILE}"):
        import_open_clip(tmp_path / "oc")


def test_non_tulip_open_clip_config_is_refused():
    bad = json.loads(json.dumps(TULIP_RELEASE["b16"]))
    bad["text_cfg"].update(pool_type="argmax", no_causal_mask=False)
    with pytest.raises(ConversionError, match=r"text_cfg.no_causal_mask=False .*text_cfg.pool_type='argmax'"):
        plain_config_from_open_clip(bad, "X.json")


def test_cli_convert_open_clip_needs_a_tokenizer(exported, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tulip_mega.cli", "convert", exported["checkpoint"], "--to",
                           "open_clip", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--to open_clip needs the run's SentencePiece model" in proc.stderr
