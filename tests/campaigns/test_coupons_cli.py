"""`patron coupons generate / export`: bearer codes from the command line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from campaigns import codes, coupons
from campaigns.models_coupons import Coupon
from service.cli import main
from service.config import Config
from tests.conftest import unique


@pytest.fixture
def cli_env(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")


def test_generate_writes_a_batch_of_well_formed_codes_and_export_repeats_it(
    cli_env: None, engine: Engine, tmp_path: Path
):
    with Session(engine) as s, s.begin():
        template = coupons.create_template(
            s,
            {"code": unique("CLI"), "name": "CLI", "kind": "amount",
             "amount_off": Decimal("5"), "valid_days": 10},
            actor="test", default_timezone="Asia/Shanghai", currency="CNY",
        )  # fmt: skip
    out = tmp_path / "codes.csv"
    result = CliRunner().invoke(
        main,
        ["coupons", "generate", "--template", template.code, "--count", "1500", "--out", str(out)],
    )
    assert result.exit_code == 0, result.output
    batch_id = int(result.output.split()[1].rstrip(":"))
    lines = out.read_text().splitlines()
    assert lines[0] == "code" and len(lines) == 1501 and len(set(lines)) == 1501
    assert all(codes.is_well_formed(c) for c in lines[1:])
    with Session(engine) as s:
        stored = s.scalar(
            select(func.count()).where(Coupon.batch_id == batch_id, Coupon.member_id.is_(None))
        )
    assert stored == 1500
    again = tmp_path / "again.csv"
    exported = CliRunner().invoke(
        main, ["coupons", "export", "--batch", str(batch_id), "--out", str(again)]
    )
    assert exported.exit_code == 0, exported.output
    assert sorted(again.read_text().splitlines()) == sorted(lines)


def test_generate_from_an_unknown_template_fails_cleanly(cli_env: None):
    result = CliRunner().invoke(
        main, ["coupons", "generate", "--template", "NO-SUCH", "--count", "10"]
    )
    assert result.exit_code != 0 and "not found" in result.output
