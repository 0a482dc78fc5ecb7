"""`mess-ray search` turns its flags into the API's query parameters."""

import pytest

from mess_ray.cli import build_parser
from mess_ray.pipeline import search_options


def _args(*argv):
    return build_parser().parse_args(["search", "--track", "t1", *argv])


def test_search_flags_become_api_parameters():
    args = _args(
        "--facet",
        "tempo=2",
        "--facet",
        "dynamics=0.5",
        "--mmr",
        "0.7",
        "--exclude-track",
        "t1",
        "--min-gap-s",
        "3",
        "--filter",
        "composer=Bach",
        "--filter",
        "style=romantic",
    )
    assert search_options(args) == {
        "exclude_track": "t1",
        "min_gap_s": 3.0,
        "mmr_lambda": 0.7,
        "w_tempo": 2.0,
        "w_dynamics": 0.5,
        "filter": ["composer=Bach", "style=romantic"],
    }
    assert search_options(_args()) == {}


@pytest.mark.parametrize(
    "flag",
    [["--facet", "tempo"], ["--facet", "tempo=fast"], ["--facet", "=1"], ["--filter", "composer"]],
)
def test_malformed_search_flags_are_named(flag):
    with pytest.raises(ValueError, match="must look like"):
        search_options(_args(*flag))
