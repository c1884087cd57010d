"""`make demo`: build a small uploads tree from real sample photos and broken files,
score it with the default model, print where the Parquet went, and show each answer next
to the known one."""

from __future__ import annotations

import os
import shutil
import sys

import pandas as pd
from deltalake import DeltaTable

from gender_pipeline import samples
from gender_pipeline.cli import main as cli_main
from gender_pipeline.night.render import age_bands_line

# The demo scores with dlib's two shipped networks together, so that it shows age bands too.
DEMO_MODEL = "dlib-attributes-v1"
DEFAULT_MODEL_LINE = ("The demo answered with dlib's public-domain gender network and age predictor together "
                      f"({DEMO_MODEL}); without --model, scoring uses the production model (the gender network "
                      "alone until you promote one). A model that answers both better, fine-tuned on your own "
                      "labelled faces, in two commands:\n"
                      "  gender-pipeline retrain --config configs/face_attributes.yaml --data YOUR_FACES --format manifest\n"
                      "  gender-pipeline score --source ... --output ...   (it answers once the retrain run promoted it)")


def build_uploads(root: str) -> dict[str, str]:
    """Write the demo's uploads under `root`; returns key -> the photo's known gender (for
    the faces) or the reject reason a broken file must get."""
    files, known = {}, {}
    for index, (subject, name, data) in enumerate(samples.demo_uploads()):
        key = f"{subject}-{index:02d}/{name}"
        files[key], known[key] = data, samples.DEMO_SUBJECTS[subject]
    for index, (name, (data, reason)) in enumerate(sorted(samples.broken_files().items())):
        key = f"user-{100 + index:03d}/{name}"
        files[key], known[key] = data, reason
    samples.write_tree(root, files)
    return known


def show_users(lake: str) -> None:
    users = DeltaTable(os.path.join(lake, "users")).to_pandas().sort_values("user_id")
    print(f"\nUsers table: {lake}/users  (DeltaTable('{lake}/users').to_pandas()), one answer per user:")
    counts = users["gender"].value_counts()
    print(f"  {len(users)} users: " + ", ".join(f"{g} {int(counts.get(g, 0))}" for g in ("female", "male", "unknown"))
          + f"; answered by {', '.join(sorted(set(users['model_name'] + '@' + users['model_version'])))}")
    bands = age_bands_line(users["age_band"].value_counts().to_dict())
    if bands:
        print(f"  age bands: {bands}")


def show_answers(lake: str, known: dict[str, str]) -> None:
    frame = pd.read_parquet(os.path.join(lake, "predictions")).sort_values("photo_key")
    faces = frame[frame["photo_key"].map(known).isin(["male", "female"])]
    print("\nEach photo of the two public portraits, with the model's answer and the known one:")
    right = 0
    for row in faces.itertuples():
        truth = known[row.photo_key]
        answer = (f"{row.gender} (p_male {row.p_male:.2f})" if row.status == "scored"
                  else f"rejected: {row.reject_reason}")
        if row.status == "scored" and isinstance(getattr(row, "age_band", None), str):
            answer += f", age {row.age_years:.0f} ({row.age_band})"
        right += row.gender == truth
        print(f"  {row.photo_key:<42} {answer:<44} known: {truth}")
    subject = faces["photo_key"].str.split("/").str[0].str.rsplit("-", n=1).str[0]  # grace-hopper-04/… -> grace-hopper
    answers = faces.assign(subject=subject).groupby("subject")["gender"].nunique()
    if (answers == 1).all():
        agreement = ("Every encoding of a portrait gets the same answer: the pipeline decodes them alike, so "
                     "where that answer is wrong, the model is.")
    else:
        split = ", ".join(sorted(answers[answers > 1].index))
        agreement = (f"The encodings of {split} do not all get the same answer: the model is sensitive to what "
                     f"an encoding changes (a GIF's 256 colours, a gray scan).")
    print(f"{right} of {len(faces)} right. {agreement}\n{DEFAULT_MODEL_LINE}")


def main() -> int:
    base = os.path.abspath(os.environ.get("DEMO_DIR", "demo-output"))
    shutil.rmtree(base, ignore_errors=True)
    uploads, lake, registry = (os.path.join(base, d) for d in ("uploads", "lake", "registry"))
    known = build_uploads(uploads)
    print(f"demo: wrote {len(known)} sample uploads to {uploads}", flush=True)
    status = cli_main(["score", "--source", uploads, "--output", lake, "--registry", registry, "--model", DEMO_MODEL])
    if status == 0:
        print(f"\nParquet dataset: {lake}/predictions  (pandas.read_parquet('{lake}/predictions'))")
        show_users(lake)
        show_answers(lake, known)
    return status


if __name__ == "__main__":
    sys.exit(main())
