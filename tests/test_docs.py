"""The configuration reference (docs/config.md) is generated from the typed schema: it must match it."""
from ldm_tune.config_docs import PAGE, render


def test_the_config_reference_is_up_to_date():
    assert PAGE.read_text() == render(), "docs/config.md is out of date: run `make docs`"


def test_the_reference_names_every_key_with_its_default_and_meaning():
    page = render()
    for row in ("| `checkpoint_minutes` | float \\| null | `null` |", "## `train.optimizer.prodigy`",
                "| `report_to` | list[\"tensorboard\" \\| \"wandb\"] | `[\"tensorboard\"]` | the trackers to report to |",
                "| `repeats` | int | `1` | how many times an epoch visits each of its pictures |"):
        assert row in page, row
