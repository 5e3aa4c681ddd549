import pytest

from tl_degen import Site, SiteError
from tl_degen.sites import check_forward_order, parse_sites


@pytest.mark.parametrize(
    "spec, kind, layer, positions, name",
    [
        ("resid_pre.0", "resid_pre", 0, None, "resid_pre.0"),
        ("resid_pre.0:all", "resid_pre", 0, None, "resid_pre.0"),
        ("resid_mid.3:last", "resid_mid", 3, (-1,), "resid_mid.3:last"),
        ("mlp_post.1:3", "mlp_post", 1, (3,), "mlp_post.1:3"),
        ("resid_post.12:0,2", "resid_post", 12, (0, 2), "resid_post.12:0,2"),
        ("logits", "logits", None, None, "logits"),
        ("logits:last", "logits", None, (-1,), "logits:last"),
        (" resid_pre.2:-2 ", "resid_pre", 2, (-2,), "resid_pre.2:-2"),
    ],
)
def test_parse_and_print(spec, kind, layer, positions, name):
    s = Site.parse(spec)
    assert (s.kind, s.layer, s.positions) == (kind, layer, positions)
    assert s.name == name == str(s)
    assert Site.parse(s.name) == s


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resid_pr.0", "unknown site kind"),
        ("resid_pre", "needs a layer"),
        ("logits.0", "takes no layer"),
        ("resid_pre.0:first", "cannot parse positions"),
        ("resid_pre.0:1,1", "repeated positions"),
        ("resid_pre.x", "cannot parse site"),
        (3, "a site is a string"),
    ],
)
def test_bad_names(spec, message):
    with pytest.raises(SiteError, match=message):
        Site.parse(spec)


def test_resolve_positions():
    assert Site.parse("resid_pre.0").resolve_positions(3) == [0, 1, 2]
    assert Site.parse("resid_pre.0:last").resolve_positions(3) == [2]
    assert Site.parse("resid_pre.0:0,-1").resolve_positions(5) == [0, 4]
    with pytest.raises(SiteError, match="out of range"):
        Site.parse("resid_pre.0:3").resolve_positions(3)
    with pytest.raises(SiteError, match="same token twice"):
        Site.parse("resid_pre.0:0,-3").resolve_positions(3)


def test_forward_order():
    sites = parse_sites(["resid_pre.0", "resid_mid.0", "mlp_post.0", "resid_post.0",
                         "resid_pre.1", "logits"])
    check_forward_order(sites)
    with pytest.raises(SiteError, match="out of forward order"):
        check_forward_order(parse_sites(["resid_post.0", "resid_mid.0"]))
    with pytest.raises(SiteError, match="appears twice"):
        check_forward_order(parse_sites(["resid_pre.0", "resid_pre.0:last"]))
    with pytest.raises(SiteError, match="no sites"):
        parse_sites([])


def test_site_fields_are_validated():
    assert Site("resid_pre", 0, [0, 2]).positions == (0, 2)
    assert hash(Site("resid_pre", 0, [0, 2])) == hash(Site.parse("resid_pre.0:0,2"))
    with pytest.raises(SiteError, match="layer must be an int"):
        Site("resid_pre", "1")
    with pytest.raises(SiteError, match="positions must be integers"):
        Site("resid_pre", 0, (1.5,))
