"""Templates: saved per channel and locale, unknown variables rejected, sandboxed, previewed."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.exceptions import SecurityError
from sqlalchemy import select
from sqlalchemy.orm import Session

from campaigns.templates import _ENV, Compiled, Fast, Variant, render, template_exists
from service.models import AuditEntry, Member
from tests.conftest import KeyFactory, unique

ZH = {
    "subject": "{{ member.name }}，生日快乐",
    "body": "{{ store.name }} 送您 {{ coupon.value }} 元券 {{ coupon.code }}，"
    "{{ coupon.expiry }} 前有效。{% if tier.name %}{{ tier.name }} 会员专享{% endif %}",
}
EN = {"subject": "Happy birthday, {{ member.name }}", "body": "Code {{ coupon.code }}"}


def test_save_list_and_exists(client: FlaskClient, auth: KeyFactory, session: Session):
    name, headers = unique("bday").lower(), auth("marketer")
    created = client.put(f"/v1/templates/{name}/sms/zh-CN", json=ZH, headers=headers)
    assert created.status_code == 201 and created.json["version"] == 1
    replaced = client.put(f"/v1/templates/{name}/sms/zh-CN", json=ZH, headers=headers)
    assert replaced.status_code == 200 and replaced.json["version"] == 2
    assert client.put(f"/v1/templates/{name}/email/en", json=EN, headers=headers).status_code == 201
    got = client.get(f"/v1/templates/{name}", headers=auth("analyst")).json
    assert [(v["channel"], v["locale"]) for v in got["variants"]] == [
        ("email", "en"),
        ("sms", "zh-CN"),
    ]
    assert template_exists(session, name) and not template_exists(session, name + "x")
    assert session.scalar(
        select(AuditEntry.action).where(AuditEntry.entity_id == f"{name}/sms/zh-CN").limit(1)
    ) in ("template.created", "template.updated")


def test_unknown_variables_fields_and_syntax_errors_are_rejected_per_field(
    client: FlaskClient, auth: KeyFactory
):
    headers = auth("marketer")
    resp = client.put(
        "/v1/templates/bad/sms/en",
        json={"subject": "{{ membr.name }}", "body": "{{ coupon.cod }} {{ member.nmae }}"},
        headers=headers,
    )
    assert resp.status_code == 422
    errors = resp.json["errors"]
    assert any("membr" in e for e in errors["subject"])
    assert any("coupon.cod" in e for e in errors["body"])
    assert any("member.nmae" in e for e in errors["body"])
    syntax = client.put("/v1/templates/bad/sms/en", json={"body": "{% if %}"}, headers=headers)
    assert syntax.status_code == 422 and "syntax error" in syntax.json["errors"]["body"][0]
    channel = client.put("/v1/templates/bad/fax/en", json={"body": "x"}, headers=headers)
    assert channel.status_code == 422 and "channel" in channel.json["errors"]
    assert client.get("/v1/templates/bad", headers=headers).status_code == 404


def test_sandbox_refuses_to_reach_python_internals():
    variant = Variant(1, 1, "x", "sms", "en", "", "{{ extra.__class__.__mro__ }}")
    with pytest.raises(SecurityError):
        render(variant, {"extra": {}})


def test_preview_renders_for_a_member_in_their_locale(
    client: FlaskClient, auth: KeyFactory, session: Session, store: str
):
    name, headers = unique("pv").lower(), auth("marketer")
    client.put(f"/v1/templates/{name}/sms/zh-CN", json=ZH, headers=headers)
    client.put(f"/v1/templates/{name}/sms/en", json=EN, headers=headers)
    zh = Member(
        external_id=unique("M"),
        name="张三",
        locale="zh-CN",
        tier="gold",
        consent_sms=True,
        phone="+8613800000000",
    )
    en = Member(external_id=unique("M"), name="Ann", locale="en", timezone="UTC")
    session.add_all([zh, en])
    session.flush()
    resp = client.post(
        f"/v1/templates/{name}/preview",
        json={
            "member_id": zh.external_id,
            "coupon": {
                "code": "ABCD-EFGH",
                "amount_off": "50",
                "valid_until": "2026-12-31T15:59:59+00:00",
            },
        },
        headers=headers,
    )
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert body["channel"] == "sms" and body["locale"] == "zh-CN"
    assert body["subject"] == "张三，生日快乐"
    assert "50.00 元券 ABCD-EFGH" in body["body"] and "gold 会员专享" in body["body"]
    assert "2026-12-31" in body["body"]
    english = client.post(
        f"/v1/templates/{name}/preview",
        json={"member_id": en.external_id, "channel": "sms"},
        headers=headers,
    )
    assert english.json["locale"] == "en" and english.json["body"] == "Code SAMPLE-CODE"
    missing = client.post(
        f"/v1/templates/{name}/preview", json={"member_id": "nobody"}, headers=headers
    )
    assert missing.status_code == 404
    no_email = client.post(
        f"/v1/templates/{name}/preview",
        json={"member_id": zh.external_id, "channel": "email"},
        headers=headers,
    )
    assert no_email.status_code == 422 and "channel" in no_email.json["errors"]


# --- the fast renderer agrees with Jinja -----------------------------------------------

_TEXT = st.text(alphabet=st.characters(blacklist_characters="{}%#"), max_size=8)
_KEYS = st.sampled_from(["name", "code", "x", "items", "0", "_y", "keys"])
_PATHS = st.tuples(
    st.sampled_from(["member", "coupon", "extra", "store", "undeclared"]),
    st.lists(st.tuples(st.booleans(), _KEYS | st.integers(0, 2)), max_size=3),
)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=5) | st.decimals(places=2),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_KEYS, inner, max_size=3),
    max_leaves=8,
)


def _expression(root: str, steps: list[tuple[bool, object]]) -> str:
    out = root
    for attribute, key in steps:
        if attribute and isinstance(key, str) and key.isidentifier():
            out += f".{key}"
        else:
            out += f"[{key!r}]"
    return out


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.one_of(_TEXT, _PATHS), max_size=6),
    trim=st.booleans(),
    context=st.dictionaries(
        st.sampled_from(["member", "coupon", "extra", "store"]), _VALUES, max_size=4
    ),
)
def test_fast_renderer_prints_what_jinja_prints_or_leaves_it_to_jinja(parts, trim, context):
    """Text and `{{ a.b['c'] }}` templates render without Jinja; the result (or the error)
    is exactly Jinja's, whatever the values: missing keys, lists, dict method names."""
    source = "".join(
        p if isinstance(p, str) else ("{{- " if trim else "{{ ") + _expression(*p) + " }}"
        for p in parts
    )
    variant = Variant(1, 1, "t", "sms", "en", source, source + "\n")
    jinja = (_ENV.from_string(variant.subject), _ENV.from_string(variant.body))
    try:
        expected: object = (jinja[0].render(context).strip(), jinja[1].render(context))
    except Exception as exc:  # StrictUndefined, sandbox refusals
        expected = type(exc)
    try:
        got: object = Compiled(variant).render(context)
    except Exception as exc:
        got = type(exc)
    assert got == expected


def test_plain_templates_take_the_fast_path_and_others_do_not():
    assert Fast.compile("{{ member.name }}，券 {{ coupon['code'] }} {{ extra.a.b }}") is not None
    for source in ("{% if tier.name %}x{% endif %}", "{{ coupon.code | upper }}", "{{ 1 }}"):
        assert Fast.compile(source) is None, source
    fast = Fast.compile("Hi {{ member.name }}")
    assert fast is not None and fast.roots == {"member"}
    assert fast.render({"member": {"name": None}}) == "Hi "
