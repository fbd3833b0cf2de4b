"""Configs that are valid key by key but not what the user meant are refused (or warned about) in one line, before
any data loads: a token count that hangs a CPU, a model name no config file has, a split of a handful of images."""

import logging

import pytest

from data_fixtures import write_image_tree
from softmoe.harness.config import check_config
from softmoe.harness.data import build_datasets
from softmoe.harness.errors import ConfigError
from softmoe.harness.loop import train
from softmoe.harness.plausibility import group_options, threads_warning, warn_small_splits


def test_own_images_at_the_default_224_px_with_patch_2_are_refused_naming_both_keys(compose_run):
    # data.root does not exist: the token count is refused before any data is looked for
    cfg = compose_run("data=imagefolder", "data.root=/nonexistent/images", "data.num_classes=2")
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    message = str(raised.value)
    assert message.startswith("model.patch_size=2: data.img_size=224 makes (224/2)² + 0 = 12,544 tokens per image")
    assert "trainer.max_tokens_per_image=4096" in message and "model.patch_size=16" in message
    assert "trainer.max_tokens_per_image=null" in message and "\n" not in message
    assert "use model.patch_size=16, model=vit_small, a smaller data.img_size, or lift" in message  # 224 = 14 x 16 px


def test_the_token_limit_suggests_only_models_whose_patches_tile_the_image(compose_run):
    # digits' 8 px images: vit_small's 16 px patches do not fit them (model=vit_small is refused on digits)
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run("trainer.max_tokens_per_image=1"))
    assert "use model.patch_size=8, a smaller data.img_size, or lift the limit" in str(raised.value)


def test_the_token_limit_counts_the_class_token_and_can_be_lifted_on_purpose(compose_run):
    over = ("data=synthetic", "data.img_size=64", "model.patch_size=1", "model.class_token=true",
            "model.global_pool=token")
    with pytest.raises(ConfigError, match=r"\(64/1\)² \+ 1 = 4,097 tokens"):
        check_config(compose_run(*over))
    check_config(compose_run(*over, "trainer.max_tokens_per_image=null"))
    check_config(compose_run(*over, "trainer.max_tokens_per_image=5000"))


def test_a_cpu_sized_own_data_run_passes_the_check(compose_run):
    check_config(compose_run("data=imagefolder", "data.root=/x", "data.img_size=32", "model.patch_size=4",
                                "data.num_classes=2"))


def test_an_unknown_model_name_is_refused_in_one_line(compose_run):
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run("model.name=vit_mega"))
    assert str(raised.value) == (
        "model.name=vit_mega: not a model; must be one of vit_base, vit_huge, vit_large, vit_micro, vit_small, "
        "vit_tiny (pick one with model=<name>, e.g. model=vit_base; model.name only labels it)"
    )


@pytest.mark.parametrize("option", group_options("model"))
def test_every_model_option_keeps_its_own_name(compose_run, option):
    assert compose_run(f"model={option}").model.name == option


def test_a_one_image_validation_split_is_warned_about_in_one_line(compose_run, tmp_path, caplog):
    root = write_image_tree(tmp_path / "images", train={"a": 40, "b": 40}, val={"a": 10, "b": 10})
    cfg = compose_run("data=imagefolder", f"data.root={root}", "data.img_size=32", "data.num_classes=2")
    data = build_datasets(cfg.data, cfg.paths.data_dir)
    assert len(data.val) == 1  # val_size=0.01 of 80 images
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.plausibility"):
        warn_small_splits(data)
    (record,) = caplog.records
    assert record.getMessage() == (
        "the validation split holds 1 image: its accuracy moves in steps of 100 points, too coarse to mean "
        "anything; give it more (data.val_size)"
    )


def test_a_folder_with_fewer_training_images_than_a_batch_is_refused_saying_how_far_to_lower_it(compose_run, tmp_path):
    root = write_image_tree(tmp_path / "images", train={"a": 30, "b": 30}, val={"a": 10, "b": 10})
    cfg = compose_run("data=imagefolder", f"data.root={root}", "data.img_size=32", "model.patch_size=4",
                      "data.num_classes=2", "data.val_size=0.2", "logger=none")
    with pytest.raises(ConfigError) as refused:
        train(cfg, tmp_path / "run")
    assert str(refused.value) == (
        "trainer.batch_size=64: larger than the 48 training examples of data=imagefolder (what data.val_size=0.2 "
        "leaves for training); must be at most 48"
    )


def test_slots_per_image_are_held_to_the_token_limit_and_it_can_be_lifted(compose_run):
    # 16,000 slots for the 16 tokens of digits' images: the first step ran out of memory, with no message
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run("moe.slots_per_expert=1000"))
    assert str(raised.value) == (
        "moe.slots_per_expert=1000: moe.num_experts x moe.slots_per_expert = 16 x 1000 = 16,000 slots per image for "
        "its 16 tokens, more than trainer.max_tokens_per_image=4096 (each slot is a vector every expert layer "
        "processes, as a token is); use fewer, or lift the limit with trainer.max_tokens_per_image=null"
    )
    check_config(compose_run("moe.slots_per_expert=1000", "trainer.max_tokens_per_image=null"))
    check_config(compose_run("moe.slots_per_expert=1000", "moe=dense"))  # no Soft MoE layer, no slots


TURNS = "the jobs take turns on the cores, each slower than alone; use"


def test_parallel_jobs_asking_for_more_threads_than_cores_are_warned_about_with_the_value_to_use(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # joblib's default for a null num_threads
    assert threads_warning(8, 1, None, 2) == (
        f"launcher.n_jobs=8 x trainer.num_threads=1 = 8 threads at once on 2 cores: {TURNS} launcher.n_jobs=2")
    assert threads_warning(2, 2, None, 2) == (
        f"launcher.n_jobs=2 x trainer.num_threads=2 = 4 threads at once on 2 cores: {TURNS} trainer.num_threads=1 "
        "(cores / n_jobs, as conf/launcher/joblib.yaml advises)")
    assert threads_warning(8, None, 4, 2) == (  # 4 jobs: 4 at once; null: joblib gives each cores // 4, at least 1
        f"launcher.n_jobs=8 (4 at once) x trainer.num_threads=null (1 each) = 4 threads at once on 2 cores: {TURNS} "
        "launcher.n_jobs=2")
    assert threads_warning(-1, 2, None, 4).startswith("launcher.n_jobs=-1 (4 at once) x trainer.num_threads=2 = 8 ")
    for fits in ((2, 1, None, 2), (8, 1, 2, 2), (3, None, None, 4), (-1, None, None, 16)):
        assert threads_warning(*fits) is None
