"""GeCo text stage (tulip_mega/datagen/geco): parsing/validation, rule fallback, LLM end to end, resume.

References are independent of the code under test: expected texts are written out by hand,
shards are read back with shards.iter_samples, and the loader's tokens are compared with the
tokenizer's own encoding of the texts found in key.json.
"""

from __future__ import annotations

import json
import os
import random
import sys
import textwrap

import pytest
from harness import kill_mid_second_shard, read_all

from tulip_mega.datagen.geco.rules import RuleTextGenerator, edit_caption
from tulip_mega.datagen.geco.run import run_geco_text, select_shards, shard_seed, worker_from_env
from tulip_mega.datagen.geco.text import GenerationSettings, ModelNotFoundError, parse_output, validate_texts
from tulip_mega.data.shards import expand_shards, iter_samples
from tulip_mega.cli import main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --------------------------------------------------------------------------- parsing / validation


def test_parse_output_strips_labels_lists_quotes_and_extra_lines() -> None:
    assert parse_output("Paraphrase: a crimson disc on blue.\nSure, here is more") == "a crimson disc on blue."
    assert parse_output('\n\n  1. "two dogs under a table"  ') == "two dogs under a table"
    assert parse_output("- Caption: a cat") == "a cat"
    assert parse_output("   \n \n") == ""


def test_validate_drops_empty_duplicate_overlong_and_identical_to_original() -> None:
    caption = "a red circle on a blue background"
    settings = GenerationSettings(max_words=12)
    out = validate_texts(
        caption,
        paraphrases=["A crimson disc on a blue backdrop.", "", "a crimson disc on a blue backdrop",
                     "A red circle on a blue background."],
        negatives=["a green circle on a blue background", "  ", "A red circle on a blue background",
                   "a red circle under a blue background " + "very " * 20, "a crimson disc on a blue backdrop",
                   "a green circle on a blue background", "a red square on a blue background"],
        negative_kinds=["attribute", "count", "object", "relation", "object", "attribute", "object"],
        settings=settings,
    )
    assert out.paraphrases == ["A crimson disc on a blue backdrop."]
    assert out.negatives == ["a green circle on a blue background", "a red square on a blue background"]
    assert out.negative_kinds == ["attribute", "object"]
    # empty: "" and "  "; duplicate: 2nd paraphrase, negative == paraphrase, repeated negative;
    # same_as_caption: paraphrase echo and the negative equal to the caption; too_long: 1
    assert dict(out.dropped) == {"empty": 2, "duplicate": 3, "same_as_caption": 2, "too_long": 1}
    # a negative never equals the original caption, whatever its case/punctuation
    assert all(n.lower().strip(".") != caption for n in out.negatives)
    with pytest.raises(ValueError, match="negative kinds"):
        validate_texts(caption, [], ["x"], [], settings)


def test_rule_edits_change_the_named_part_and_are_seeded() -> None:
    rng = random.Random(0)
    cap = "a red circle on a blue background"
    obj = edit_caption(cap, "object", rng)
    assert obj is not None and obj.split()[2] in {"square", "triangle", "star", "cross", "hexagon", "heart"}
    assert obj.split()[:2] + obj.split()[3:] == cap.split()[:2] + cap.split()[3:]
    attr = edit_caption(cap, "attribute", rng)
    assert attr is not None and attr != cap and len(attr.split()) == len(cap.split())
    assert edit_caption(cap, "count", rng).split()[:3] in (["two", "red", "circles"], ["three", "red", "circles"],
                                                           ["four", "red", "circles"])
    assert edit_caption(cap, "relation", rng) == "a red circle under a blue background"
    assert edit_caption("three cats", "count", random.Random(1)).split()[1] == "cats"
    assert edit_caption("hello world", "relation", rng) is None
    gen = RuleTextGenerator()
    gen.start_shard(7)
    first = gen.generate([cap, cap], ["k0", "k1"])
    gen.start_shard(7)
    assert [t.negatives for t in gen.generate([cap, cap], ["k0", "k1"])] == [t.negatives for t in first]
    assert gen.metadata()["method"] == "rules"


def test_worker_split_and_seeds() -> None:
    shards = [f"s{i}.tar" for i in range(7)]
    parts = [select_shards(shards, w, 3) for w in range(3)]
    assert sorted(sum(parts, [])) == shards and parts[1] == ["s1.tar", "s4.tar"]
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}
    assert worker_from_env(env) == (3, 6, 1)
    assert worker_from_env({}) == (0, 1, 0)
    assert shard_seed(0, "/a/x.tar") == shard_seed(0, "/b/x.tar") != shard_seed(1, "/a/x.tar")


# --------------------------------------------------------------------------- tiny LLM end to end


def _tiny_llm(path: str, texts: list[str]) -> None:
    """A randomly initialised 1-layer Llama with a WordLevel tokenizer trained on ``texts``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]")
    fast.save_pretrained(path)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)


def test_llm_end_to_end_shards_reach_the_loader(small_shards, shapes_data, tmp_path, capsys) -> None:
    from tulip_mega.datagen.geco.text import EDIT_PROMPTS, PARAPHRASE_PROMPTS

    before = read_all(small_shards)
    model = str(tmp_path / "llm")
    _tiny_llm(model, [s["txt"].decode() for s in before.values()] + list(PARAPHRASE_PROMPTS)
              + list(EDIT_PROMPTS.values()) + ["Caption: Answer:"])
    out = tmp_path / "out"
    args = ["geco", "text", "--model", model, "--in", small_shards, "--out", str(out), "--seed", "3",
            "--max-new-tokens", "6", "--batch-size", "4", "--no-progress"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["written"] == 3 and summary["samples"] == 18
    after = read_all(str(out))
    assert sorted(after) == sorted(before)
    kept = 0
    for key, s in after.items():
        old, new = before[key], after[key]
        assert [e for e in new if not e.startswith("__")] == [e for e in old if not e.startswith("__")]
        for ext in ("jpg", "txt", "pos.jpg", "neg.jpg"):
            assert new[ext] == old[ext], (key, ext)
        meta, old_meta = json.loads(new["json"]), json.loads(old["json"])
        assert {k: v for k, v in meta.items() if k not in ("paraphrases", "negatives", "negative_kinds",
                                                              "geco_text")} == \
            {k: v for k, v in old_meta.items() if k not in ("paraphrases", "negatives")}
        assert meta["geco_text"]["method"] == "llm" and meta["geco_text"]["model"] == model
        caption = old["txt"].decode().strip().lower()
        assert all(n.strip().lower() != caption and n.strip() for n in meta["negatives"])
        assert len(meta["negatives"]) == len(meta["negative_kinds"]) <= 4 and len(meta["paraphrases"]) <= 2
        kept += len(meta["paraphrases"]) + len(meta["negatives"])
    assert kept > 0

    # same seed -> byte-identical shards; rerun on a complete output skips every shard
    out2 = tmp_path / "out2"
    assert cli_main([str(out2) if a == str(out) else a for a in args]) == 0
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()
    capsys.readouterr()
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"] == 3

    # the GeCo fields reach the loss stack's inputs: tokens and valid masks of the loader
    pytest.importorskip("nvidia.dali")
    from tulip_mega.data.dali_loader import DaliLoader
    from tulip_mega.data.dali_pipeline import ViewPlan
    from tulip_mega.data.tokenizer import Tokenizer

    tok = Tokenizer(shapes_data["tokenizer"], 24)
    plan = ViewPlan(image_size=16, paraphrases=2, negatives=4)
    batch = next(iter(DaliLoader(str(out), 6, plan, tok, gpu=False, shuffle_buffer=1, num_epochs=1, threads=1)))
    assert batch.paraphrase_valid.any() or batch.negative_valid.any()
    for b, key in enumerate(batch.keys):
        meta = json.loads(after[key]["json"])
        for field, valid, count in (("paraphrases", batch.paraphrase_valid, 2), ("negatives", batch.negative_valid, 4)):
            texts = [t for t in meta[field] if t.strip()][:count]
            assert valid[b].tolist() == [j < len(texts) for j in range(count)], (key, field)
            for j, t in enumerate(texts):
                assert getattr(batch, field)[b, j].tolist() == tok.encode(t)[0].tolist()


def test_missing_model_is_a_clear_error(small_shards, tmp_path, capsys) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotFoundError, match="no-such-model.*--model eda"):
        from tulip_mega.datagen.geco.text import LLMTextGenerator

        LLMTextGenerator(missing)
    assert cli_main(["geco", "text", "--model", missing, "--in", small_shards, "--out", str(tmp_path / "o")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


# --------------------------------------------------------------------------- kill and resume

_SLOW_RUN = textwrap.dedent("""
    import sys, time
    from tulip_mega.datagen.geco.rules import RuleTextGenerator
    from tulip_mega.datagen.geco.run import run_geco_text

    class Slow(RuleTextGenerator):
        def generate(self, captions, keys):
            time.sleep(0.25)
            return super().generate(captions, keys)

    run_geco_text(sys.argv[1], sys.argv[2], Slow(), seed=5, batch_size=2, progress=False)
""")


def test_kill_mid_run_then_rerun_loses_and_duplicates_nothing(small_shards, tmp_path) -> None:
    out = tmp_path / "out"
    names = [os.path.basename(s) for s in expand_shards(small_shards)]
    kill_mid_second_shard([sys.executable, "-c", _SLOW_RUN, small_shards, str(out)], out, names)
    first = (out / names[0]).read_bytes()
    summary = run_geco_text(small_shards, str(out), RuleTextGenerator(), seed=5, batch_size=2, progress=False)
    assert summary.skipped == [str(out / names[0])] and len(summary.written) == 2
    assert (out / names[0]).read_bytes() == first
    assert sorted(os.listdir(out)) == sorted(names)  # no .partial left behind
    for name, src in zip(names, expand_shards(small_shards)):
        keys = [s["__key__"] for s in iter_samples(str(out / name))]  # raises on a corrupt shard
        assert keys == [s["__key__"] for s in iter_samples(src)]
    # identical to an uninterrupted run
    clean = tmp_path / "clean"
    run_geco_text(small_shards, str(clean), RuleTextGenerator(), seed=5, batch_size=2, progress=False)
    for name in names:
        assert (clean / name).read_bytes() == (out / name).read_bytes()
        meta = [json.loads(s["json"]) for s in iter_samples(str(clean / name))]
        assert all(m["geco_text"]["method"] == "rules" and m["negatives"] for m in meta)


def test_damaged_input_keeps_good_samples_and_still_completes(small_shards, tmp_path) -> None:
    src = expand_shards(small_shards)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    data = open(src[0], "rb").read()
    (bad_dir / "x.tar").write_bytes(data[: len(data) // 2])  # cut mid-shard
    good_keys = []
    try:
        for s in iter_samples(str(bad_dir / "x.tar")):
            if not s.get("__partial__"):
                good_keys.append(s["__key__"])
    except Exception:
        pass
    summary = run_geco_text(str(bad_dir), str(tmp_path / "o"), RuleTextGenerator(), progress=False)
    assert summary.damaged == [str(bad_dir / "x.tar")] and summary.samples == len(good_keys) > 0
    assert [s["__key__"] for s in iter_samples(str(tmp_path / "o" / "x.tar"))] == good_keys
