"""A three-step pipeline, prep -> train -> evaluate, handing its artifacts to the router.

    artifact-router run &                  # the daemon, with ./router.yaml or defaults
    python examples/pipeline.py            # emits three bundles into the spool
    python examples/pipeline.py --read     # ... and reads the run back when it has landed

Each @step emits what it returns as one bundle: the run id comes from ROUTER_RUN_ID
(or Airflow's / Argo's variables), else one is generated for this process; the step
name is the function's name.  Artifacts passed into a step become its lineage inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from router import Dataset, Flow, Metrics, Model, Parameters, step
from router.client import NotFound
from router.sdk import run_context

PIPELINE = "fraud_training"


@step
def prep(rows: int = 600, seed: int = 7) -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(seed)
    amount = rng.gamma(2.0, 40.0, rows)
    hour = rng.integers(0, 24, rows)
    label = ((amount > 120) | ((hour < 5) & (amount > 60))).astype(int)
    frame = pd.DataFrame({"amount": amount, "hour": hour, "label": label})
    train, test = frame.iloc[: rows * 3 // 4], frame.iloc[rows * 3 // 4 :]
    return (
        Dataset(train, name="train_data", upload=True),
        Dataset(test, name="test_data", upload=True),
    )


@step
def train(train_data: Dataset, c: float = 1.0) -> tuple[Model, Parameters]:
    frame = train_data.data
    clf = LogisticRegression(C=c, max_iter=500).fit(frame[["amount", "hour"]], frame["label"])
    accuracy = float(clf.score(frame[["amount", "hour"]], frame["label"]))
    model = Model.create(
        data=clf,
        name="fraud_detector",
        upload=True,
        input_schema={"amount": "float", "hour": "int"},
        metadata={"metrics": {"train_accuracy": accuracy}},
    )
    return model, Parameters(C=c, max_iter=500, name="hparams")


@step
def evaluate(model: Model, test_data: Dataset) -> Metrics:
    frame = test_data.data
    accuracy = float(model.data.score(frame[["amount", "hour"]], frame["label"]))
    return Metrics(accuracy=accuracy, rows=len(frame), name="evaluation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read", action="store_true", help="wait for the run, then read it")
    args = parser.parse_args()

    with run_context(pipeline=PIPELINE):
        train_data, test_data = prep()
        model, _ = train(train_data)
        evaluate(model, test_data)
    run_id = model.ref.split("/")[1] if model.ref else "?"
    print(f"emitted {PIPELINE}/{run_id}: prep -> train -> evaluate")

    if args.read:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(NotFound):  # not routed yet
                run = Flow(PIPELINE)[run_id]
                if "evaluate" in run:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the run did not land within 60 s: is the daemon running?")
            time.sleep(0.5)
        print("accuracy:", run["evaluate"].data.evaluation["accuracy"])
        detector = run["train"]["fraud_detector"]
        print("model:", detector.version, detector.uri, "made from",
              [a.pathspec for a in detector.inputs])


if __name__ == "__main__":
    main()
