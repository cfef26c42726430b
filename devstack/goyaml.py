"""YAML for Go readers (kubectl, helm): strings that Go's YAML reads as numbers are quoted.

PyYAML follows YAML 1.1, where a float needs a dot, so it writes a string such as `64367e80` (a random hex
label value) bare; Go's YAML reads that as a number and the API server refuses the object. The dumper here
knows the wider YAML 1.2 forms and quotes every string that has one of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import yaml


class _GoSafeDumper(yaml.SafeDumper):
    pass


_NUMBER = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?
        |[-+]?0x[0-9a-fA-F_]+|[-+]?0o[0-7_]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
    re.X,
)
_GoSafeDumper.add_implicit_resolver("tag:yaml.org,2002:float", _NUMBER, list("-+.0123456789"))


def dump(document: Any, *, sort_keys: bool = True) -> str:
    return yaml.dump(document, Dumper=_GoSafeDumper, sort_keys=sort_keys)


def dump_all(documents: Iterable[Any], *, sort_keys: bool = True) -> str:
    return yaml.dump_all(documents, Dumper=_GoSafeDumper, sort_keys=sort_keys)
