"""The users table against the known labels of an uploads folder (`make_uploads.py`'s
`truth.csv`): how many users have an answer, how many of those answers are right, and
which models gave them.

    python benchmarks/users_accuracy.py --uploads /tmp/uh --output /tmp/uh-lake
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", required=True, help="make_uploads.py's --out (truth.csv with user_gender)")
    parser.add_argument("--output", required=True, help="the scoring output (its users/ table)")
    parser.add_argument("--version", type=int, default=None, help="a version of the users table (time travel)")
    args = parser.parse_args()
    from deltalake import DeltaTable

    with open(os.path.join(args.uploads, "truth.csv"), newline="") as handle:
        truth = {row["photo_key"].split("/")[0]: row["user_gender"] for row in csv.DictReader(handle)}
    users = DeltaTable(os.path.join(args.output, "users"), version=args.version).to_pandas()
    users["truth"] = users["user_id"].map(truth)
    decided = users[users["gender"] != "unknown"]
    report = {
        "users_in_source": len(truth),
        "users_answered": len(users),
        "users_unknown": int((users["gender"] == "unknown").sum()),
        "accuracy_on_decided": round(float((decided["gender"] == decided["truth"]).mean()), 4),
        "accuracy_on_all_answers": round(float((users["gender"] == users["truth"]).mean()), 4),
        # every answered user decided by p_male alone, as if no model abstained
        "accuracy_full_coverage": round(float(((users["p_male"] >= 0.5).map({True: "male", False: "female"})
                                                == users["truth"]).mean()), 4),
        "newest_photo_rejected": int(users["newest_reject_reason"].notna().sum()),
        "models": {f"{n}@{v}": int(c) for (n, v), c in users.groupby(["model_name", "model_version"]).size().items()},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
