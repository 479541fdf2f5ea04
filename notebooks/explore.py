"""Exploration notebook (marimo): the lake, the warehouse's training set, the champion's
calibration from MLflow and the live performance of logged predictions, read through the same
library code the platform runs.

    uv run marimo edit notebooks/explore.py     # interactive, in the browser
    uv run python notebooks/explore.py          # every cell, as a script (what `make test` does)

It uses the EASYMLOPS_* settings of the environment (the embedded stack's by default): run it
after `make demo`.
"""

import marimo

__generated_with = "0.17.0"
app = marimo.App(width="medium")


@app.cell
def _():
    import json
    import tempfile

    import marimo as mo
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import polars as pl

    from easymlops import lake, live, registry, training
    from easymlops.features import MODEL_FEATURES
    from easymlops.settings import get_settings

    settings = get_settings()
    return (
        MODEL_FEATURES,
        json,
        lake,
        live,
        mo,
        pl,
        plt,
        registry,
        settings,
        tempfile,
        training,
    )


@app.cell
def _(lake, mo, pl, settings):
    # Silver: events per day and type.
    silver = lake.read_silver(settings)
    per_day = (
        silver.group_by("event_date", "event_type")
        .len()
        .pivot(on="event_type", index="event_date", values="len")
        .sort("event_date")
        .fill_null(0)
    )
    mo.md(f"## Silver events: {silver.height:,} rows over {per_day.height} days")
    return (per_day,)


@app.cell
def _(per_day):
    per_day
    return


@app.cell
def _(MODEL_FEATURES, plt, training, settings):
    # The training set's feature distributions, by label.
    data = training.load_training_data(settings)
    rows = data.train
    shown = [
        f
        for f in MODEL_FEATURES
        if f
        in (
            "price",
            "session_product_views",
            "user_purchase_rate",
            "product_conversion_rate",
            "product_price_vs_category",
            "session_seconds",
        )
    ]
    feature_figure, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, name in zip(axes.flat, shown, strict=False):
        for label, color in ((0, "#2e86c1"), (1, "#c0392b")):
            values = rows.filter(rows["label"] == label)[name].drop_nulls().to_numpy()
            ax.hist(values, bins=30, alpha=0.5, density=True, color=color, label=f"label {label}")
        ax.set_title(name)
    axes.flat[0].legend()
    feature_figure.tight_layout()
    feature_figure
    return data, feature_figure


@app.cell
def _(json, plt, registry, settings, tempfile):
    # The champion's calibration, as logged with the model in MLflow.
    champion = registry.champion(settings)
    calibration = []
    if champion is not None:
        client = registry.client(settings)
        with tempfile.TemporaryDirectory() as tmp:
            artifact = client.download_artifacts(
                champion.run_id, "evaluation/calibration.json", tmp
            )
            with open(artifact) as handle:
                calibration = json.load(handle)
    calibration_figure, cal_ax = plt.subplots(figsize=(5, 5))
    cal_ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    cal_ax.plot(
        [b["mean_predicted"] for b in calibration],
        [b["observed_rate"] for b in calibration],
        marker="o",
    )
    cal_ax.set_xlabel("mean predicted probability")
    cal_ax.set_ylabel("observed purchase rate")
    cal_ax.set_title(f"champion v{champion.version if champion else '-'} calibration")
    calibration_figure
    return calibration, champion


@app.cell
def _(lake, live, pl, settings):
    # Live performance: logged predictions against their realized labels, per day and version.
    from deltalake import DeltaTable

    path = lake.bronze_path(settings, "predictions")
    days = (
        pl.read_delta(path)["scored_at"].dt.date().unique().sort().to_list()
        if DeltaTable.is_deltatable(path)
        else []
    )
    live_rows = [
        {
            "day": str(day),
            "version": result.model_version,
            "predictions": result.predictions,
            "labelled": result.labelled,
            "auc": result.metrics.get("test_auc"),
            "brier": result.metrics.get("test_brier"),
        }
        for day in days
        for result in live.performance(settings, day)
    ]
    live_table = pl.DataFrame(live_rows) if live_rows else pl.DataFrame()
    live_table
    return (live_table,)


@app.cell
def _(calibration, champion, data, live_table, per_day):
    print(
        f"notebook: {per_day.height} silver days, {data.train.height} training rows, "
        f"champion {champion.version if champion else 'none'} with "
        f"{len(calibration)} calibration bins, {live_table.height} live performance rows"
    )
    return


if __name__ == "__main__":
    app.run()
