"""Checkpoint conversion: megatron (TP=2 x PP=2) -> plain PyTorch / Hugging Face SiglipModel and back,
and resharding to TP=1 x PP=1.

One module-scoped run does the expensive multi-process work once:
- 4 ranks (TP=2 x PP=2): train 2 steps, save; continue 2 more steps (reference losses);
  build a second model from a random Hugging Face SiglipModel (model.init_from_hf) and save it;
- `reshard` the step-2 checkpoint to TP=1 x PP=1;
- 1 rank (TP=1 x PP=1): load the step-2 checkpoint and compute embeddings on fixed inputs;
  load the resharded checkpoint and continue 2 steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import build_train_step
from tulip_mega.parallel.spawn import run_distributed

REPO = Path(__file__).resolve().parents[2]
PARALLEL = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"]
SERIAL = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"]
EXTRA = ["train.global_batch_size=16", "train.micro_batch_size=4"]  # 4 micro-batches at PP=2


def _inputs(cfg, n: int = 6):
    g = torch.Generator().manual_seed(123)
    size = cfg.model.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    tokens = torch.randint(3, 200, (n, cfg.model.text.context_length), generator=g)
    tokens[:, -1] = 1  # eos last, like the tokenizer with a full-length caption
    return images, tokens


def _batches(cfg, first: int, last: int):
    from harness import global_batches, rank_microbatches

    return rank_microbatches(cfg, global_batches(cfg, last)[first:last], 0, 1)


def parallel_worker(root: str, hf_dir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from tulip_mega.training.checkpoint import save_checkpoint
    from tulip_mega.training.checkpoint import model_shape

    cfg, model, opt, sch, step = build_train_step(PARALLEL + EXTRA)
    it = _batches(cfg, 0, 2)
    for _ in range(2):
        step(it)
    ckpt = save_checkpoint(Path(root) / "trained", 2, model, opt, sch, None, model_shape(cfg))
    it = _batches(cfg, 2, 4)
    continued = [step(it)["loss"] for _ in range(2)]

    cfg2, model2, opt2, sch2, _ = build_train_step(PARALLEL + EXTRA + [f"model.init_from_hf={hf_dir}"])
    imported = save_checkpoint(Path(root) / "imported", 0, model2, opt2, sch2, None, model_shape(cfg2))
    return {"checkpoint": str(ckpt), "continued_parallel": continued, "imported": str(imported)}


def serial_worker(checkpoint: str, resharded: str, hf_dir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing

    from tulip_mega.convert.hf import import_hf_siglip
    from tulip_mega.models.init import load_full_tensors
    from tulip_mega.training.checkpoint import load_checkpoint
    from tulip_mega.training.checkpoint import model_shape

    # The original TP=2 x PP=2 checkpoint, loaded under TP=1 x PP=1: reference embeddings.
    cfg, model, opt, sch, _ = build_train_step(SERIAL + EXTRA)
    load_checkpoint(Path(checkpoint), model, opt, sch, None, model_shape(cfg))
    images, tokens = _inputs(cfg)
    model[0].module.eval()
    with torch.no_grad():
        out = model[0].module(images, tokens)
    ref = {k: v.detach().clone() for k, v in out.tensors().items()}

    # load_full_tensors names the offending key.
    errors = []
    full = import_hf_siglip(hf_dir)
    for bad in ({k: v for k, v in full.items() if k != "text_head.weight"},
                {**full, "vision_block.layers.mlp.linear_fc1.weight": torch.zeros(2, 128, 64)}):
        try:
            load_full_tensors(model[0].module, bad)
        except (KeyError, ValueError) as e:
            errors.append(str(e))

    # Resharding copies every tensor (weights and optimizer moments) exactly.
    a = dist_checkpointing.load_plain_tensors(checkpoint)
    b = dist_checkpointing.load_plain_tensors(resharded)
    reshard_diff = {k: (a[k] - b[k]).abs().max().item() if k in b else None
                    for k in a if torch.is_tensor(a[k]) and a[k].is_floating_point()}

    # The resharded checkpoint, continued for 2 steps.
    cfg, model, opt, sch, step = build_train_step(SERIAL + EXTRA)
    restored = load_checkpoint(Path(resharded), model, opt, sch, None, model_shape(cfg))
    it = _batches(cfg, 2, 4)
    continued = [step(it)["loss"] for _ in range(2)]
    return {"reference": ref, "continued_resharded": continued, "resharded_step": restored["step"],
            "errors": errors, "reshard_diff": reshard_diff}


def _hf_config():
    from transformers import SiglipConfig

    from harness import make_cfg

    cfg = make_cfg(PARALLEL + EXTRA)
    v, t = cfg.model.vision, cfg.model.text
    common = dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, attention_dropout=0.0)
    return SiglipConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.ffn_hidden_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         max_position_embeddings=t.context_length, projection_size=v.hidden_size,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, **common),
        vision_config=dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                           num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                           image_size=v.image_size, patch_size=v.patch_size, **common),
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    pytest.importorskip("transformers")
    from transformers import SiglipModel

    from tulip_mega.training.reshard import reshard

    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    hf = SiglipModel(_hf_config()).eval()
    with torch.no_grad():  # every tensor random (HF init leaves LayerNorms at 1/0)
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(str(root / "hf_random"))
    par = run_distributed(parallel_worker, 4, str(root), str(root / "hf_random"))[0]
    resharded = reshard(par["checkpoint"], 1, 1, root / "resharded", overrides=EXTRA)
    ser = run_distributed(serial_worker, 1, par["checkpoint"], str(resharded), str(root / "hf_random"))[0]
    return {"root": root, "hf_random": hf, "resharded": resharded, **par, **ser}


@pytest.fixture(scope="module")
def plain_dir(runs) -> Path:
    from tulip_mega.convert.plain import convert_checkpoint

    out = runs["root"] / "plain"
    t0 = time.perf_counter()
    stats = convert_checkpoint(runs["checkpoint"], out, log=lambda s: None)
    print(f"convert to pytorch: {stats['tensors']} tensors, {stats['bytes'] / 2**20:.2f} MiB, "
          f"{time.perf_counter() - t0:.2f}s")
    return out


def test_plain_model_imports_without_megatron():
    # megatron / TE / DALI made unimportable (as if uninstalled), then a tiny model runs.
    code = (
        "import sys\n"
        "for m in ('megatron', 'transformer_engine', 'nvidia', 'nvidia.dali'): sys.modules[m] = None\n"
        "import torch, tulip_mega.convert, tulip_mega.convert.plain_model as pm\n"
        "t = dict(num_layers=1, hidden_size=8, num_heads=2, ffn_hidden_size=16)\n"
        "cfg = pm.PlainConfig(vision=dict(image_size=8, patch_size=4, **t), text=dict(vocab_size=10, context_length=4, **t))\n"
        "m = pm.TulipPlainModel(cfg)\n"
        "s = m.similarity(m.encode_image(torch.randn(2, 3, 8, 8)), m.encode_text(torch.randint(0, 10, (3, 4))))\n"
        "assert s.shape == (2, 3)\n"
        "bad = [k for k, v in sys.modules.items() if v is not None and k.split('.')[0] in ('megatron', 'transformer_engine')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr


@pytest.mark.multiprocess
def test_plain_model_matches_megatron(runs, plain_dir):
    from harness import make_cfg
    from tulip_mega.convert.plain_model import TulipPlainModel

    model = TulipPlainModel.from_pretrained(plain_dir)
    images, tokens = _inputs(make_cfg(SERIAL))
    ref = runs["reference"]
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(tokens)
        sims = model.similarity(img, txt)
    d_img = (img - ref["image_emb"]).abs().max().item()
    d_txt = (txt - ref["text_emb"]).abs().max().item()
    print(f"plain vs megatron: image max diff {d_img:.2e}, text max diff {d_txt:.2e}")
    torch.testing.assert_close(img, ref["image_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, ref["text_emb"], rtol=0, atol=1e-5)
    expected = ref["logit_scale"] * ref["image_emb"] @ ref["text_emb"].T + ref["logit_bias"]
    torch.testing.assert_close(sims, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.multiprocess
def test_hf_export_matches_megatron(runs, tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoProcessor, SiglipModel, SiglipTokenizer

    from tulip_mega.data.tokenizer import Tokenizer, train_tokenizer
    from harness import make_cfg
    from tulip_mega.convert.hf import export_hf

    captions = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow", "white")
                for s in ("circle", "square", "triangle", "star") for b in ("dark", "light", "grey")]
    spm_model = train_tokenizer(captions * 4, str(tmp_path / "tok"), vocab_size=64)
    out = tmp_path / "hf"
    export_hf(runs["checkpoint"], out, tokenizer=spm_model, log=lambda s: None)
    hf = SiglipModel.from_pretrained(str(out)).eval()
    images, tokens = _inputs(make_cfg(SERIAL))
    ref = runs["reference"]
    with torch.no_grad():
        # transformers 5 returns an output object, 4.x the pooled tensor.
        img = hf.get_image_features(pixel_values=images)
        txt = hf.get_text_features(input_ids=tokens)
        img = torch.nn.functional.normalize(getattr(img, "pooler_output", img), dim=-1)
        txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
        logits = hf(pixel_values=images, input_ids=tokens).logits_per_image
    print(f"hf vs megatron: image max diff {(img - ref['image_emb']).abs().max():.2e}, "
          f"text max diff {(txt - ref['text_emb']).abs().max():.2e}")
    torch.testing.assert_close(img, ref["image_emb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, ref["text_emb"], rtol=0, atol=1e-5)
    expected = ref["logit_scale"] * ref["image_emb"] @ ref["text_emb"].T + ref["logit_bias"]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)

    # The processor: our tokenizer's ids through Hugging Face.
    tok = SiglipTokenizer.from_pretrained(str(out))
    ours = Tokenizer(spm_model, context_length=make_cfg(SERIAL).model.text.context_length)
    text = ["a red circle on a dark background", "a blue star"]
    theirs = tok(text, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    assert theirs.tolist() == ours.encode(text).tolist()
    processor = AutoProcessor.from_pretrained(str(out))
    batch = processor(text=text, images=[torch.zeros(3, 40, 40).numpy().transpose(1, 2, 0).astype("uint8")] * 2,
                      padding="max_length", return_tensors="pt")
    assert batch["pixel_values"].shape[-1] == make_cfg(SERIAL).model.vision.image_size


@pytest.mark.multiprocess
def test_hf_round_trip_through_tp2_pp2(runs, tmp_path):
    from safetensors.torch import load_file

    from tulip_mega.convert.hf import export_hf

    out = tmp_path / "back"
    export_hf(runs["imported"], out, log=lambda s: None)
    back = load_file(str(out / "model.safetensors"))
    original = {k: v for k, v in runs["hf_random"].state_dict().items() if not k.endswith("position_ids")}
    assert set(back) == set(original), set(back) ^ set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["projection_size"] == cfg["vision_config"]["hidden_size"]


@pytest.mark.multiprocess
def test_reshard_then_continue_matches(runs):
    assert runs["resharded_step"] == 2
    assert Path(runs["resharded"]).name == "step_0000002"
    diffs = runs["reshard_diff"]
    assert any("exp_avg" in k for k in diffs) and any("vision_block" in k for k in diffs), sorted(diffs)[:5]
    assert all(d == 0.0 for d in diffs.values()), {k: d for k, d in diffs.items() if d != 0.0}
    a, b = runs["continued_parallel"], runs["continued_resharded"]
    print(f"continued losses: TP2xPP2 {a}, resharded TP1xPP1 {b}")
    assert len(a) == len(b) == 2
    # The first continued loss is a forward of identical weights (reduction order only: ~1e-7).
    # The second follows an AdamW step, which amplifies those float32 differences early in
    # training (as in test_parallel.py: 1e-4 relative; measured 1.2e-5 with 16 text tokens, 1.7e-4
    # since the debug text context is 64: Adam's first steps turn near-zero gradient noise into
    # lr-sized updates, and 4x more text positions give it more such entries).
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    assert a[1] == pytest.approx(b[1], rel=1e-3)


def test_load_full_tensors_names_the_bad_key(runs):
    missing, shape = runs["errors"]
    assert "text_head.weight" in missing and "no tensor" in missing
    assert "vision_block.layers.mlp.linear_fc1.weight" in shape and "(2, 128, 64)" in shape and "(2, 256, 64)" in shape


def test_cli_convert_pytorch(runs, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "tulip_mega.cli", "convert", runs["checkpoint"], "--to", "pytorch",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 88 tensors" in proc.stdout, proc.stdout
    print(f"cli convert: {proc.stdout.strip().splitlines()[-1]}")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_siglip_that_cannot_be_expressed_is_refused():
    from tulip_mega.convert.hf import plain_config_from_siglip
    from tulip_mega.convert.common import ConversionError

    good = {"text_config": dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=4, projection_size=12),
            "vision_config": dict(hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=8, patch_size=4)}
    assert plain_config_from_siglip(good).text["hidden_size"] == 8
    bad = json.loads(json.dumps(good))
    bad["text_config"]["projection_size"] = 8
    bad["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(ConversionError, match="projection_size 8 != vision hidden_size 12.*|.*hidden_act"):
        plain_config_from_siglip(bad)


def test_init_from_hf_checks_the_recipe(runs):
    from harness import make_cfg
    from tulip_mega.convert.hf import import_hf_siglip
    from tulip_mega.convert.common import ConversionError

    hf_dir = runs["root"] / "hf_random"
    assert "text_head.weight" in import_hf_siglip(hf_dir, make_cfg(SERIAL).model)
    with pytest.raises(ConversionError, match=r"model.layernorm_eps: .* 1e-06, the recipe 1e-05"):
        import_hf_siglip(hf_dir, make_cfg(SERIAL + ["model.layernorm_eps=1e-5"]).model)


def test_te_names_map_like_local_names():
    from tulip_mega.convert.plain import megatron_key_to_plain

    heads = {"vision": 2, "text": 2}
    ln = torch.randn(3, 8)
    te = dict(megatron_key_to_plain("text_block.layers.self_attention.linear_qkv.layer_norm_weight", ln, heads))
    local = dict(megatron_key_to_plain("text_block.layers.input_layernorm.weight", ln, heads))
    assert te.keys() == local.keys() == {f"text_model.encoder.layers.{i}.layer_norm1.weight" for i in range(3)}
    te = dict(megatron_key_to_plain("vision_block.layers.mlp.linear_fc1.layer_norm_bias", ln, heads))
    assert set(te) == {f"vision_model.encoder.layers.{i}.layer_norm2.bias" for i in range(3)}
    assert not list(megatron_key_to_plain("vision_block.layers.self_attention.linear_qkv._extra_state", ln, heads))


def test_qkv_split_follows_megatron_layout():
    from tulip_mega.convert.plain import megatron_key_to_plain

    nh, hn, h, L = 4, 3, 12, 2
    w = torch.arange(L * 3 * h * h, dtype=torch.float32).reshape(L, 3 * h, h)
    out = dict(megatron_key_to_plain("vision_block.layers.self_attention.linear_qkv.weight", w, {"vision": nh}))
    # Megatron layout: per head [q rows, k rows, v rows].
    q0 = out["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    k0 = out["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(q0[hn:2 * hn], w[1, 3 * hn:4 * hn]) and torch.equal(k0[:hn], w[1, hn:2 * hn])
