"""`tulip-mega plan`'s data-rate section (tulip_mega/data_rate.py): arithmetic, and every recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tulip_mega.config import ConfigError, load_config
from tulip_mega.config.streams import input_streams
from tulip_mega.data_rate import HOST_SAMPLES_PER_CORE, data_rate, sample_set
from tulip_mega.plan import main, make_plan

REPO = Path(__file__).resolve().parents[2]
DEBUG = ["model.size=debug", "model.vision.image_size=32", "model.vision.patch_size=8",
         "train.global_batch_size=64", "train.micro_batch_size=4"]
TULIP = ["loss.weights.image_image=1", "loss.weights.text_text=1", "data.views.global_crops=2",
         "data.views.local_crops=4", "data.views.local_size=16", "data.views.geco_images=true",
         "data.views.paraphrases=2", "data.views.negatives=2"]


def test_rates_follow_the_plan_and_the_recipes_streams() -> None:
    cfg = load_config(None, DEBUG + TULIP)
    plan = make_plan(cfg, nodes=1, gpus_per_node=4)
    rate = data_rate(cfg, plan)
    assert sample_set(input_streams(cfg)) == rate.sample_set == "tulip"
    assert rate.samples_per_s == pytest.approx(plan.samples_per_s / plan.layout.data_parallel)
    assert rate.decodes_per_s == pytest.approx(3 * rate.samples_per_s)  # image + pos/neg edits
    assert rate.views_per_s == pytest.approx((1 + 1 + 4 + 2) * rate.samples_per_s)
    assert rate.host_cores == pytest.approx(rate.samples_per_s / HOST_SAMPLES_PER_CORE["tulip"])
    mine = data_rate(cfg, plan, host_samples_per_core=250.0)
    assert mine.host_cores == pytest.approx(rate.samples_per_s / 250.0)
    plain = load_config(None, DEBUG)
    assert data_rate(plain, make_plan(plain, 1, 4)).sample_set == "siglip"
    with pytest.raises(ValueError, match="host-samples-per-core"):
        data_rate(cfg, plan, host_samples_per_core=0)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_plan_prints_samples_per_second_and_cores_for_every_recipe(recipe, capsys) -> None:
    path = REPO / "recipes" / recipe
    # the tiny CPU recipes only fit small layouts; tulip_6b needs TP 8 x PP 4 = 4 nodes
    for nodes, gpus in ((1, 8), (1, 4), (1, 2), (1, 1), (4, 8)):
        try:
            plan = make_plan(load_config(path, ["precision.fp8=null"]), nodes=nodes, gpus_per_node=gpus)
            break
        except ConfigError:
            continue
    else:
        pytest.fail(f"{recipe}: no layout on 1-8 GPUs or 4 nodes of 8")
    layout = ["--nodes", str(nodes), "--gpus-per-node", str(gpus)]
    assert main([str(path), *layout]) == 0
    out = capsys.readouterr().out
    per_rank = plan.samples_per_s / plan.layout.data_parallel
    assert f"{per_rank:,.0f} samples/s" in out
    assert "CPU cores per loading rank" in out
    assert main([str(path), *layout, "--host-samples-per-core", "100"]) == 0
    assert f"{per_rank / 100:.2f} CPU cores per loading rank" in capsys.readouterr().out
