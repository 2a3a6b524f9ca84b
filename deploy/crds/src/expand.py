#!/usr/bin/env python3
"""Writes ../gateway-networking-k8s-io.yaml from gateway-api.source.yaml.

The source is one YAML list so that anchors reach across the CRDs (they share
schema parts); the output is one plain document per object, as `kubectl apply`
and validators expect. control/tests/crds.rs checks that the two agree.
"""
import pathlib
import yaml

here = pathlib.Path(__file__).parent
source = (here / "gateway-api.source.yaml").read_text()
header = ""
for line in source.splitlines():
    if not line.startswith("#"):
        break
    header += line + "\n"
objects = yaml.safe_load(source)


class Plain(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


body = yaml.dump_all(objects, Dumper=Plain, sort_keys=False, width=100, explicit_start=True)
(here.parent / "gateway-networking-k8s-io.yaml").write_text(
    "# Generated from src/gateway-api.source.yaml by src/expand.py; edit the source.\n"
    + header
    + body
)
