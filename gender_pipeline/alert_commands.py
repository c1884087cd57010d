"""`gender-pipeline alerts`: the nightly flow's alerts on the Prefect server (flows.alerts)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta

from gender_pipeline.flows.alerts import FINISH_WITHIN, install_alerts, remove_alerts
from gender_pipeline.runtime.errors import EXIT_USAGE
from gender_pipeline.server import configured_api_url


def alerts(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    api = os.environ.get("PREFECT_API_URL") or configured_api_url()
    if not api:
        print("gender-pipeline: alerts live on a Prefect server: set PREFECT_API_URL (or a Prefect profile's) to "
              "the one your deployments report to; a temporary server would forget them at exit", file=sys.stderr)
        return EXIT_USAGE
    if args.remove:
        if args.webhook_url or args.finish_within or args.header:
            parser.error("--remove takes no other option")
        removed = remove_alerts()
        print(f"gender-pipeline: removed {len(removed)} alert(s) from {api}", file=sys.stderr)
        print(json.dumps({"removed": removed}, indent=2))
        return 0
    if not args.webhook_url:
        parser.error("alerts needs --webhook-url (or --remove)")
    within = timedelta(seconds=args.finish_within) if args.finish_within else FINISH_WITHIN
    created = install_alerts(args.webhook_url, within, headers=dict(args.header))
    print(f"gender-pipeline: {len(created)} alerts on {api}, posting to the webhook block gender-pipeline-alerts",
          file=sys.stderr)
    print(json.dumps({"server": api, "alerts": [{"name": a.name, "id": str(a.id), "description": a.description}
                                                for a in created]}, indent=2))
    return 0
