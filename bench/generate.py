"""Synthetic data generator for Patron's bulk import (stores, members, transactions).

Usage::

    python -m bench.generate --members 2000 --transactions 40000 --out /tmp/patron-gen

The behavioural model is a Pareto/NBD-style one (close cousin of BG/NBD):

* every member has a signup time spread over ``[start, end)`` (more signups later on),
* a gamma-distributed purchase rate (heterogeneous buyers),
* a dropout time (exponential lifetime with a gamma-distributed rate) after which they
  never buy again, so many members go quiet,
* a log-normal median spend, so spend is skewed.

Purchase counts are drawn jointly (multinomially, proportional to rate x active window) so
that purchases + refunds add up to exactly ``--transactions``. About 3 % of the rows are
refunds of an earlier purchase of the same member.

Generation runs on blocks of members; every block has its own seed, so the output only
depends on the arguments (not on ``--workers``). Blocks are formatted in worker processes
with pre-built string tables and ``%``-templates and written in order.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

# The import formats are the importer's; the generator writes exactly those columns.
from service.importer import MEMBER_FIELDS, STORE_FIELDS, TRANSACTION_FIELDS

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Objs = npt.NDArray[np.object_]

# ---------------------------------------------------------------------------------------
# Static vocabularies
# ---------------------------------------------------------------------------------------

BLOCK_MEMBERS = 10_000  # fixed: changing it changes the output for a given seed
REFUND_SHARE = 0.03  # share of all rows that are refunds
SECONDS_PER_DAY = 86_400
CHINA_OFFSET = timezone(timedelta(hours=8))

# (code prefix, city, region, weight, signature location)
CITIES: tuple[tuple[str, str, str, float, str], ...] = (
    ("SH", "Shanghai", "East", 10.0, "Nanjing Rd"),
    ("BJ", "Beijing", "North", 9.0, "Wangfujing"),
    ("GZ", "Guangzhou", "South", 6.0, "Tianhe Rd"),
    ("SZ", "Shenzhen", "South", 6.0, "Coastal City"),
    ("HZ", "Hangzhou", "East", 4.0, "West Lake"),
    ("CD", "Chengdu", "West", 4.0, "Chunxi Rd"),
    ("WH", "Wuhan", "Central", 3.0, "Jianghan Rd"),
    ("NJ", "Nanjing", "East", 3.0, "Xinjiekou"),
    ("CQ", "Chongqing", "West", 3.0, "Jiefangbei"),
    ("XA", "Xi'an", "West", 2.0, "Bell Tower"),
    ("TJ", "Tianjin", "North", 2.0, "Binjiang Rd"),
    ("SU", "Suzhou", "East", 2.0, "Guanqian St"),
    ("CS", "Changsha", "Central", 2.0, "Wuyi Square"),
    ("ZZ", "Zhengzhou", "Central", 2.0, "Erqi Square"),
    ("QD", "Qingdao", "North", 1.5, "Taidong"),
    ("XM", "Xiamen", "South", 1.5, "Zhongshan Rd"),
    ("KM", "Kunming", "West", 1.0, "Nanping St"),
    ("HF", "Hefei", "Central", 1.0, "Huaihe Rd"),
    ("DL", "Dalian", "North", 1.0, "Qingniwa"),
    ("NB", "Ningbo", "East", 1.0, "Tianyi Square"),
)
LOCATIONS = (
    "Wanda Plaza",
    "Joy City",
    "Raffles City",
    "MixC",
    "IFC Mall",
    "Taikoo Li",
    "Grand Gateway",
    "Central Plaza",
    "Airport T2",
    "Station Mall",
    "Riverside",
    "Hang Lung Plaza",
    "Outlet Village",
    "Tech Park",
    "Old Town",
)
ECOM_STORES = (
    ("ECOM-TM", "Tmall Flagship Store", "Online"),
    ("ECOM-JD", "JD.com Flagship Store", "Online"),
)

CATEGORIES = ("shoes", "apparel", "accessories", "beauty", "home", "electronics", "food")
CATEGORY_WEIGHTS = np.array([0.16, 0.26, 0.12, 0.14, 0.10, 0.08, 0.14])
CATEGORY_PRICE = np.array([1.5, 1.2, 0.8, 0.9, 1.0, 2.5, 0.4])  # relative price level
SKUS_PER_CATEGORY = 500
QUANTITIES = 3  # item quantities are 1..QUANTITIES
QUANTITY_WEIGHTS = np.array([0.82, 0.13, 0.05])
ITEM_COUNT_WEIGHTS = np.array([0.55, 0.25, 0.13, 0.07])  # 1..4 items per purchase
MAX_ITEMS = len(ITEM_COUNT_WEIGHTS)

# (IANA name, share, phone country code, mobile prefixes, subscriber digits)
TIMEZONES: tuple[tuple[str, float, str, tuple[str, ...], int], ...] = (
    (
        "Asia/Shanghai",
        0.80,
        "+86",
        ("138", "139", "135", "136", "137", "150", "151", "158", "186", "187", "188", "130"),
        8,
    ),
    ("Asia/Tokyo", 0.03, "+81", ("90", "80", "70"), 8),
    ("Asia/Singapore", 0.02, "+65", ("8", "9"), 7),
    ("Asia/Kolkata", 0.02, "+91", ("98", "99", "97"), 8),
    ("Europe/London", 0.04, "+44", ("77", "78", "79"), 8),
    ("America/New_York", 0.03, "+1", ("212", "646", "917"), 7),
    ("America/Los_Angeles", 0.04, "+1", ("213", "310", "424"), 7),
    ("Pacific/Auckland", 0.02, "+64", ("21", "22", "27"), 7),
)

CN_SURNAMES = (
    ("王", "wang"), ("李", "li"), ("张", "zhang"), ("刘", "liu"), ("陈", "chen"),
    ("杨", "yang"), ("黄", "huang"), ("赵", "zhao"), ("吴", "wu"), ("周", "zhou"),
    ("徐", "xu"), ("孙", "sun"), ("马", "ma"), ("朱", "zhu"), ("胡", "hu"),
    ("郭", "guo"), ("何", "he"), ("林", "lin"), ("罗", "luo"), ("高", "gao"),
    ("郑", "zheng"), ("梁", "liang"), ("谢", "xie"), ("宋", "song"), ("欧阳", "ouyang"),
)  # fmt: skip
CN_GIVEN = (
    ("伟", "wei"), ("芳", "fang"), ("娜", "na"), ("敏", "min"), ("静", "jing"),
    ("丽", "li"), ("强", "qiang"), ("磊", "lei"), ("军", "jun"), ("洋", "yang"),
    ("勇", "yong"), ("艳", "yan"), ("杰", "jie"), ("娟", "juan"), ("涛", "tao"),
    ("明", "ming"), ("超", "chao"), ("秀英", "xiuying"), ("霞", "xia"), ("平", "ping"),
    ("刚", "gang"), ("桂英", "guiying"), ("晨", "chen"), ("子涵", "zihan"), ("欣怡", "xinyi"),
    ("浩然", "haoran"), ("雨桐", "yutong"), ("宇轩", "yuxuan"), ("梓萱", "zixuan"),
    ("俊杰", "junjie"),
)  # fmt: skip
EN_FIRST = (
    "James", "Mary", "John", "Patricia", "Robert", "Jennifer", "Michael", "Linda",
    "David", "Elizabeth", "William", "Susan", "Oliver", "Amelia", "Noah", "Olivia",
    "Aroha", "Nikau", "Priya", "Arjun", "Yuki", "Haruto", "Chloé", "Zoë", "Siobhan",
)  # fmt: skip
# (display, ascii for e-mail addresses)
EN_LAST = (
    ("Smith", "smith"), ("Johnson", "johnson"), ("Williams", "williams"), ("Brown", "brown"),
    ("Jones", "jones"), ("Miller", "miller"), ("Davis", "davis"), ("Wilson", "wilson"),
    ("Taylor", "taylor"), ("Walker", "walker"), ("O'Brien", "obrien"), ("García", "garcia"),
    ("Müller", "muller"), ("Nguyen", "nguyen"), ("Patel", "patel"), ("Sharma", "sharma"),
    ("Tanaka", "tanaka"), ("Sato", "sato"), ("Ngata", "ngata"), ("Tan", "tan"),
)  # fmt: skip
EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example.cn")
# Tag vocabulary with the probability that a member carries the tag.
TAGS = (
    ("vip", 0.05),
    ("newsletter", 0.30),
    ("student", 0.06),
    ("employee", 0.01),
    ("wechat_follower", 0.25),
    ("corporate", 0.02),
    ("influencer", 0.005),
)
REFERRALS = ("store", "friend", "wechat", "search", "social_ad")


# ---------------------------------------------------------------------------------------
# Configuration and global plan
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    members: int
    transactions: int
    out: Path
    seed: int
    stores: int
    start: date
    end: date
    fmt: str
    workers: int


@dataclass(frozen=True)
class TxFormat:
    """Pre-built string tables and row templates for one output format."""

    templates: tuple[str, ...]  # index k-1: row template for a transaction with k items
    item_heads: Objs  # per (sku, quantity): item text up to the amount value
    store_channel: Objs  # per store: "store,channel" fragment
    purchase_kind: str  # kind (+ empty original id) fragment for purchases
    refund_kind: str  # %-template taking the original transaction number


@dataclass
class Plan:
    """Everything decided globally (before the per-block work)."""

    cfg: Config
    start_ts: int
    end_ts: int
    store_codes: list[str]
    n_physical: int
    store_weights: F64  # popularity of physical stores (sums to 1)
    # per member
    signup: I64  # epoch seconds
    window: I64  # seconds during which the member buys (signup .. dropout/end)
    spend: F64  # median spend per purchase, CNY
    tz: npt.NDArray[np.int8]
    zh: Bools
    home: npt.NDArray[np.int16]
    fav: npt.NDArray[np.int8]
    purchase_start: I64  # len N+1: purchase slots of member i are [ps[i], ps[i+1])
    refunded: Bools  # per purchase slot
    block_tx_start: I64  # len blocks+1: first transaction number (0-based) of each block
    # time tables
    hour0: int  # epoch hour of the first column of the offset tables
    off_minutes: npt.NDArray[np.int32]  # (tz, hour) -> UTC offset in minutes
    off_index: npt.NDArray[np.int8]  # (tz, hour) -> index into off_strings
    off_strings: Objs
    local_hour0: int  # local epoch hour of local_hours[0]
    local_hours: Objs  # "YYYY-MM-DDTHH:"
    min_sec: Objs  # "MM:SS" for 0..3599
    txf: TxFormat

    @property
    def n_blocks(self) -> int:
        return len(self.block_tx_start) - 1


def _epoch(d: date) -> int:
    """Midnight of ``d`` in China time (+08:00) as epoch seconds."""
    return int(datetime(d.year, d.month, d.day, tzinfo=CHINA_OFFSET).timestamp())


def _offset_string(minutes: int) -> str:
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _offset_tables(
    hour0: int, n_hours: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int8], Objs]:
    """UTC offsets (minutes) of every timezone for every hour, exact across DST changes."""
    table = np.zeros((len(TIMEZONES), n_hours), dtype=np.int32)
    for z, (name, *_rest) in enumerate(TIMEZONES):
        zone = ZoneInfo(name)

        def offset(hour: int, zone: ZoneInfo = zone) -> int:
            moment = datetime.fromtimestamp(hour * 3600, tz=UTC).astimezone(zone)
            delta = moment.utcoffset()
            assert delta is not None
            return int(delta.total_seconds()) // 60

        # Sample daily; refine hourly only for days that contain a transition.
        for day_start in range(0, n_hours, 24):
            day_end = min(day_start + 24, n_hours)
            first, last = offset(hour0 + day_start), offset(hour0 + day_end - 1)
            if first == last:
                table[z, day_start:day_end] = first
            else:
                for h in range(day_start, day_end):
                    table[z, h] = offset(hour0 + h)
    values = sorted(set(np.unique(table).tolist()))
    index = np.searchsorted(np.array(values), table).astype(np.int8)
    strings = np.array([_offset_string(v) for v in values], dtype=object)
    return table, index, strings


def _tx_format(fmt: str) -> TxFormat:
    skus = [
        f"{cat[:3].upper()}-{num:04d}"
        for cat in CATEGORIES
        for num in range(1, SKUS_PER_CATEGORY + 1)
    ]
    cats = [cat for cat in CATEGORIES for _ in range(SKUS_PER_CATEGORY)]
    if fmt == "csv":
        # The items JSON is a quoted CSV field, so its quotes are doubled (RFC 4180), exactly
        # as csv.writer would write it.
        heads = [
            f'{{""sku"":""{sku}"",""category"":""{cat}"",""quantity"":{q},""amount"":""'
            for sku, cat in zip(skus, cats, strict=True)
            for q in range(1, QUANTITIES + 1)
        ]
        item = '%s%d.%02d""}'
        templates = tuple(
            'T-%09d,M-%07d,%s,%d.%02d,CNY,%s,%s%s%s,"[' + ",".join([item] * k) + ']"\r\n'
            for k in range(1, MAX_ITEMS + 1)
        )
        return TxFormat(
            templates=templates,
            item_heads=np.array(heads, dtype=object),
            store_channel=np.array([], dtype=object),  # filled in by _plan
            purchase_kind="purchase,",
            refund_kind="refund,T-%09d",
        )
    heads = [
        f'{{"sku":"{sku}","category":"{cat}","quantity":{q},"amount":"'
        for sku, cat in zip(skus, cats, strict=True)
        for q in range(1, QUANTITIES + 1)
    ]
    item = '%s%d.%02d"}'
    templates = tuple(
        '{"transaction_id":"T-%09d","member_id":"M-%07d",%s,"amount":"%d.%02d",'
        '"currency":"CNY",%s,"occurred_at":"%s%s%s","items":[' + ",".join([item] * k) + "]}\n"
        for k in range(1, MAX_ITEMS + 1)
    )
    return TxFormat(
        templates=templates,
        item_heads=np.array(heads, dtype=object),
        store_channel=np.array([], dtype=object),
        purchase_kind='"kind":"purchase","original_transaction_id":null',
        refund_kind='"kind":"refund","original_transaction_id":"T-%09d"',
    )


def make_stores(cfg: Config) -> list[tuple[str, str, str]]:
    """Physical stores (``SH-001``, ``BJ-002``, ...) followed by the e-commerce stores."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 3]))
    # Apportion stores to cities by weight (largest remainder), first SH-001 and BJ-002.
    weights = np.array([c[3] for c in CITIES])
    quota = cfg.stores * weights / weights.sum()
    per_city = np.floor(quota).astype(np.int64)
    short = cfg.stores - int(per_city.sum())
    per_city[np.argsort(per_city - quota, kind="stable")[:short]] += 1
    pool = np.repeat(np.arange(len(CITIES)), per_city)
    lead = [c for c in (0, 1) if per_city[c] > 0][: cfg.stores]
    for c in lead:
        pool = np.delete(pool, np.flatnonzero(pool == c)[0])
    cities = np.concatenate([np.array(lead, dtype=np.int64), rng.permutation(pool)])
    used: dict[int, int] = {}
    stores: list[tuple[str, str, str]] = []
    for i, c in enumerate(cities.tolist()):
        prefix, city, region, _weight, signature = CITIES[c]
        n = used.get(c, 0)
        used[c] = n + 1
        spots = (signature, *LOCATIONS)
        spot = spots[n % len(spots)]
        if n >= len(spots):
            spot = f"{spot} {n // len(spots) + 1}"
        stores.append((f"{prefix}-{i + 1:03d}", f"{city} {spot}", region))
    stores.extend(ECOM_STORES)
    return stores


def make_plan(cfg: Config, stores: list[tuple[str, str, str]]) -> Plan:
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    n = cfg.members
    start_ts, end_ts = _epoch(cfg.start), _epoch(cfg.end)
    span = end_ts - start_ts
    last_purchase = end_ts - 3600  # leaves room for a refund after every purchase

    n_physical = cfg.stores
    store_weights = rng.lognormal(0.0, 0.6, size=n_physical)
    store_weights /= store_weights.sum()

    # Signups: spread over the period, slightly more towards the end (growth).
    signup = start_ts + (span * rng.random(n) ** 0.8).astype(np.int64)
    signup = np.minimum(signup, last_purchase - 3600)
    # Dropout: exponential lifetime with a gamma-distributed rate (mean rate 1/540 days).
    dropout_rate = rng.gamma(1.2, 1.0 / (1.2 * 540.0), size=n)  # per day
    lifetime = rng.exponential(1.0, size=n) / dropout_rate * SECONDS_PER_DAY
    active_until = np.minimum(signup + np.minimum(lifetime, 2.0 * span), last_purchase)
    window = np.maximum(active_until.astype(np.int64) - signup, 0)
    # Heterogeneous purchase rates; counts are multinomial in rate x window, which is the
    # Poisson process conditioned on the total (so the total is exactly what we want).
    rate = rng.gamma(0.6, 1.0, size=n)
    n_refunds = round(cfg.transactions * REFUND_SHARE)
    n_purchases = cfg.transactions - n_refunds
    if n_purchases < n_refunds or n_purchases == 0:
        n_purchases, n_refunds = cfg.transactions, 0
    weight = rate * window
    if n == 0 or weight.sum() <= 0:
        if n_purchases:
            raise SystemExit("cannot place transactions: no members with an active window")
        counts = np.zeros(n, dtype=np.int64)
    else:
        counts = rng.multinomial(n_purchases, weight / weight.sum()).astype(np.int64)
    purchase_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=purchase_start[1:])
    refunded = np.zeros(n_purchases, dtype=np.bool_)
    if n_refunds:
        refunded[rng.choice(n_purchases, size=n_refunds, replace=False)] = True

    spend = rng.lognormal(np.log(160.0), 0.75, size=n)
    tz_shares = np.array([t[1] for t in TIMEZONES])
    tz = rng.choice(len(TIMEZONES), size=n, p=tz_shares / tz_shares.sum()).astype(np.int8)
    china = tz == 0
    zh = np.where(china, rng.random(n) < 0.92, rng.random(n) < 0.08)
    ecom_home = rng.random(n) < np.where(china, 0.15, 0.5)
    home = np.where(
        ecom_home,
        n_physical + (rng.random(n) < 0.4),
        rng.choice(n_physical, size=n, p=store_weights),
    ).astype(np.int16)
    fav = rng.choice(len(CATEGORIES), size=n, p=CATEGORY_WEIGHTS).astype(np.int8)

    n_blocks = (n + BLOCK_MEMBERS - 1) // BLOCK_MEMBERS
    block_tx_start = np.zeros(n_blocks + 1, dtype=np.int64)
    for b in range(n_blocks):
        lo = int(purchase_start[b * BLOCK_MEMBERS])
        hi = int(purchase_start[min((b + 1) * BLOCK_MEMBERS, n)])
        block_tx_start[b + 1] = block_tx_start[b] + (hi - lo) + int(refunded[lo:hi].sum())

    hour0 = (start_ts - 2 * SECONDS_PER_DAY) // 3600
    n_hours = (end_ts + 2 * SECONDS_PER_DAY) // 3600 - hour0 + 1
    off_minutes, off_index, off_strings = _offset_tables(hour0, n_hours)
    local_hour0 = hour0 - 24
    hours = np.arange(local_hour0, hour0 + n_hours + 24, dtype=np.int64).astype("datetime64[h]")
    local_hours = np.array(
        [h + ":" for h in np.datetime_as_string(hours, unit="h").tolist()], dtype=object
    )
    min_sec = np.array([f"{m:02d}:{s:02d}" for m in range(60) for s in range(60)], dtype=object)

    txf = _tx_format(cfg.fmt)
    codes = [s[0] for s in stores]
    channels = ["pos"] * n_physical + ["ecom"] * len(ECOM_STORES)
    if cfg.fmt == "csv":
        sc = [f"{c},{ch}" for c, ch in zip(codes, channels, strict=True)]
    else:
        sc = [f'"store":"{c}","channel":"{ch}"' for c, ch in zip(codes, channels, strict=True)]
    txf = TxFormat(
        templates=txf.templates,
        item_heads=txf.item_heads,
        store_channel=np.array(sc, dtype=object),
        purchase_kind=txf.purchase_kind,
        refund_kind=txf.refund_kind,
    )
    return Plan(
        cfg=cfg,
        start_ts=start_ts,
        end_ts=end_ts,
        store_codes=codes,
        n_physical=n_physical,
        store_weights=store_weights,
        signup=signup,
        window=window,
        spend=spend,
        tz=tz,
        zh=zh,
        home=home,
        fav=fav,
        purchase_start=purchase_start,
        refunded=refunded,
        block_tx_start=block_tx_start,
        hour0=hour0,
        off_minutes=off_minutes,
        off_index=off_index,
        off_strings=off_strings,
        local_hour0=local_hour0,
        local_hours=local_hours,
        min_sec=min_sec,
        txf=txf,
    )


# ---------------------------------------------------------------------------------------
# Members
# ---------------------------------------------------------------------------------------


def _phone_numbers(idx: I64, tz: npt.NDArray[np.int8], rng: np.random.Generator) -> list[str]:
    """Unique (for fewer than 10M members) mobile numbers in E.164 form."""
    out: list[str] = [""] * len(idx)
    pick = rng.integers(0, 1 << 30, size=len(idx))
    for z, (_name, _share, cc, prefixes, digits) in enumerate(TIMEZONES):
        sel = np.flatnonzero(tz == z)
        if not len(sel):
            continue
        modulus = 10**digits
        # Affine bijection on [0, 10**digits): scrambles the member index into digits.
        subscriber = (idx[sel] * 7_919_317 + 1_234_567) % modulus
        pre = np.array([cc + p for p in prefixes], dtype=object)[pick[sel] % len(prefixes)]
        fmt = "%s%0" + str(digits) + "d"
        for i, p, s in zip(sel.tolist(), pre.tolist(), subscriber.tolist(), strict=True):
            out[i] = fmt % (p, s)
    return out


def _birth_dates(n: int, end: date, rng: np.random.Generator) -> list[str]:
    """Ages 16-85 at ``end``; every day of the year, with extra 29 Februaries."""
    end_day = np.datetime64(end, "D")
    age_years = 16.01 + (84.99 - 16.01) * rng.beta(2.0, 4.5, size=n)
    birth = end_day - np.rint(age_years * 365.2425).astype(np.int64)
    # 29 February occurs naturally (~1/1461); push some more members onto it so that
    # leap-day birthdays are always represented, even in small data sets.
    leap = np.flatnonzero((rng.random(n) < 0.004) & (age_years > 20) & (age_years < 80))
    if len(leap):
        years = birth[leap].astype("datetime64[Y]").astype(np.int64) + 1970
        years -= years % 4
        ok = (years % 100 != 0) | (years % 400 == 0)
        leap, years = leap[ok], years[ok]
        feb29 = (years - 1970).astype("datetime64[Y]").astype("datetime64[D]") + 59
        birth[leap] = feb29
    dates: list[str] = np.datetime_as_string(birth, unit="D").tolist()
    return dates


def _attributes(fav: npt.NDArray[np.int8], rng: np.random.Generator) -> list[dict[str, Any]]:
    n = len(fav)
    has_fav = rng.random(n) < 0.45
    has_size = rng.random(n) < 0.20
    has_ref = rng.random(n) < 0.25
    sizes = rng.integers(35, 47, size=n)
    refs = rng.integers(0, len(REFERRALS), size=n)
    out: list[dict[str, Any]] = []
    for f, hf, hs, hr, size, ref in zip(
        fav.tolist(), has_fav.tolist(), has_size.tolist(), has_ref.tolist(), sizes.tolist(),
        refs.tolist(), strict=True,
    ):  # fmt: skip
        attrs: dict[str, Any] = {}
        if hf:
            attrs["favourite_category"] = CATEGORIES[f]
        if hs:
            attrs["shoe_size"] = size
        if hr:
            attrs["referral"] = REFERRALS[ref]
        out.append(attrs)
    return out


def _member_rows(plan: Plan, lo: int, hi: int, rng: np.random.Generator) -> list[list[Any]]:
    """Member rows in output order; empty values are ``None``, booleans are ``bool``."""
    n = hi - lo
    idx = np.arange(lo, hi, dtype=np.int64)
    zh = plan.zh[lo:hi]
    tz = plan.tz[lo:hi]

    sur = rng.integers(0, len(CN_SURNAMES), size=n)
    given = rng.integers(0, len(CN_GIVEN), size=n)
    first = rng.integers(0, len(EN_FIRST), size=n)
    last = rng.integers(0, len(EN_LAST), size=n)
    odd_name = rng.random(n)  # a few names that need CSV quoting
    gender = rng.choice(4, size=n, p=[0.52, 0.42, 0.02, 0.04])
    has_birth = rng.random(n) < 0.88
    has_phone = rng.random(n) < 0.90
    has_email = rng.random(n) < 0.85
    domain = rng.integers(0, len(EMAIL_DOMAINS), size=n)
    c_email = has_email & (rng.random(n) < 0.55)
    c_sms = has_phone & (rng.random(n) < 0.45)
    c_push = rng.random(n) < 0.35
    c_wechat = rng.random(n) < np.where(zh, 0.6, 0.05)
    tag_bits = np.zeros(n, dtype=np.int64)
    for j, (tag, p) in enumerate(TAGS):
        prob = np.full(n, p)
        if tag == "vip":  # big spenders are much more likely to be VIPs
            prob = np.where(plan.spend[lo:hi] > 400.0, 0.35, p / 2)
        elif tag == "wechat_follower":
            prob = np.where(zh, p, 0.02)
        tag_bits |= (rng.random(n) < prob).astype(np.int64) << j
    births = _birth_dates(n, plan.cfg.end, rng)
    phones = _phone_numbers(idx, tz, rng)
    attrs = _attributes(plan.fav[lo:hi], rng)
    has_attrs = (rng.random(n) < 0.85).tolist()
    consents = list(
        zip(c_email.tolist(), c_sms.tolist(), c_push.tolist(), c_wechat.tolist(), strict=True)
    )
    tag_list = tag_bits.tolist()

    genders = ("female", "male", "other", None)
    tz_names = [z[0] for z in TIMEZONES]
    codes = plan.store_codes
    tag_sets = [
        [t for j, (t, _p) in enumerate(TAGS) if bits >> j & 1] for bits in range(1 << len(TAGS))
    ]
    rows: list[list[Any]] = []
    for i, (number, is_zh, s, g, f, ln, odd, gen, hb, hp, he, dom, z, home) in enumerate(
        zip(
            range(lo + 1, hi + 1), zh.tolist(), sur.tolist(), given.tolist(), first.tolist(),
            last.tolist(), odd_name.tolist(), gender.tolist(), has_birth.tolist(),
            has_phone.tolist(), has_email.tolist(), domain.tolist(), tz.tolist(),
            plan.home[lo:hi].tolist(), strict=True,
        )
    ):  # fmt: skip
        if is_zh:
            s_han, s_pin = CN_SURNAMES[s]
            g_han, g_pin = CN_GIVEN[g]
            name = s_han + g_han
            local = f"{g_pin}.{s_pin}{number}"
        else:
            f_name = EN_FIRST[f]
            l_name, l_ascii = EN_LAST[ln]
            name = f"{f_name} {l_name}"
            if odd < 0.004:
                name += ", Jr."
            elif odd < 0.006:
                name = f'{f_name} "{f_name[:3]}" {l_name}'
            local = f"{f_name.lower()}.{l_ascii}{number}".replace("é", "e").replace("ë", "e")
        rows.append(
            [
                f"M-{number:07d}",
                name,
                genders[gen],
                births[i] if hb else None,
                phones[i] if hp else None,
                f"{local}@{EMAIL_DOMAINS[dom]}" if he else None,
                tz_names[z],
                "zh-CN" if is_zh else "en",
                codes[home],
                consents[i][0],
                consents[i][1],
                consents[i][2],
                consents[i][3],
                list(tag_sets[tag_list[i]]),
                attrs[i] if attrs[i] and has_attrs[i] else None,
            ]
        )
    return rows


def _members_text(rows: list[list[Any]], fmt: str) -> str:
    if fmt == "ndjson":
        return "".join(
            json.dumps(
                dict(zip(MEMBER_FIELDS, row, strict=True)),
                ensure_ascii=False,
                separators=(",", ":"),
            )
            + "\n"
            for row in rows
        )
    buf = io.StringIO()
    writer = csv.writer(buf)
    for row in rows:
        row[9:13] = ["true" if v else "false" for v in row[9:13]]
        row[13] = ";".join(row[13])
        row[14] = json.dumps(row[14], ensure_ascii=False) if row[14] else None
    writer.writerows(rows)  # None is written as an empty field
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# Transactions
# ---------------------------------------------------------------------------------------


def _tx_text(plan: Plan, b: int, lo: int, hi: int, rng: np.random.Generator) -> tuple[str, int]:
    """All transactions of members ``[lo, hi)``; returns (text, number of refunds)."""
    ps = plan.purchase_start
    counts = np.diff(ps[lo : hi + 1])
    n_p = int(ps[hi] - ps[lo])
    if n_p == 0:
        return "", 0
    mem = np.repeat(np.arange(lo, hi, dtype=np.int64), counts)
    tz = plan.tz[mem]

    # Store and channel.
    home = plan.home[mem].astype(np.int64)
    n_phys = plan.n_physical
    r = rng.random(n_p)
    other_phys = rng.choice(n_phys, size=n_p, p=plan.store_weights)
    other_ecom = n_phys + (rng.random(n_p) < 0.4)
    phys_home = home < n_phys
    store = np.where(
        phys_home,
        np.where(r < 0.72, home, np.where(r < 0.92, other_ecom, other_phys)),
        np.where(r < 0.80, home, np.where(r < 0.90, 2 * n_phys + 1 - home, other_phys)),
    )
    ecom = store >= n_phys

    # Time: uniform within the active window, then moved to a plausible local time of day
    # (shops: daytime; online: evening peak) when that stays inside the window.
    signup = plan.signup[mem]
    window = plan.window[mem]
    t = signup + (rng.random(n_p) * window).astype(np.int64)
    off = plan.off_minutes[tz, t // 3600 - plan.hour0].astype(np.int64) * 60
    local = t + off
    tod_pos = np.clip(rng.normal(15.5, 3.0, n_p), 10.0, 21.99)
    tod_ecom = np.where(
        rng.random(n_p) < 0.7, rng.normal(21.0, 2.5, n_p) % 24.0, rng.random(n_p) * 24.0
    )
    tod = (np.where(ecom, tod_ecom, tod_pos) * 3600.0).astype(np.int64)
    shaped = local - local % SECONDS_PER_DAY + tod - off
    t = np.where((shaped >= signup) & (shaped < signup + window), shaped, t)

    # Amounts and items.
    k = rng.choice(MAX_ITEMS, size=n_p, p=ITEM_COUNT_WEIGHTS) + 1
    base = plan.spend[mem] * rng.lognormal(0.0, 0.55, n_p) * (0.75 + 0.25 * k)
    cents = np.maximum(np.rint(base * 100.0).astype(np.int64), 100)
    fav = plan.fav[mem].astype(np.int64)[:, None]
    cat = np.where(
        rng.random((n_p, MAX_ITEMS)) < 0.45,
        fav,
        rng.choice(len(CATEGORIES), size=(n_p, MAX_ITEMS), p=CATEGORY_WEIGHTS),
    )
    sku = (SKUS_PER_CATEGORY * rng.random((n_p, MAX_ITEMS)) ** 2).astype(np.int64)
    qty = rng.choice(QUANTITIES, size=(n_p, MAX_ITEMS), p=QUANTITY_WEIGHTS)
    head = (cat * SKUS_PER_CATEGORY + sku) * QUANTITIES + qty
    # Split the amount over the items (every item >= 0.01, pricier categories get more).
    active = np.arange(MAX_ITEMS)[None, :] < k[:, None]
    share = rng.gamma(2.0, 1.0, size=(n_p, MAX_ITEMS)) * CATEGORY_PRICE[cat] * (qty + 1) * active
    share /= share.sum(axis=1, keepdims=True)
    item_cents = np.floor((cents - k)[:, None] * share).astype(np.int64) + active
    item_cents[:, 0] += cents - item_cents.sum(axis=1)

    # Refunds of the purchase slots picked globally: after the purchase (minutes to weeks),
    # before the end; 70 % full refunds, otherwise one item (or part of the only item).
    src = np.flatnonzero(plan.refunded[ps[lo] : ps[hi]])
    n_r = len(src)
    if n_r:
        room = plan.end_ts - 1 - t[src]
        delay = 600 + rng.exponential(4.0 * SECONDS_PER_DAY, n_r).astype(np.int64)
        late = delay > room
        delay[late] = 1 + (rng.random(int(late.sum())) * (room[late] - 1)).astype(np.int64)
        full = rng.random(n_r) < 0.7
        r_items = item_cents[src].copy()
        part = rng.uniform(0.2, 0.9, n_r)
        single = ~full & (k[src] == 1)
        r_items[single, 0] = np.maximum(1, (r_items[single, 0] * part[single]).astype(np.int64))
        mem = np.concatenate([mem, mem[src]])
        tz = np.concatenate([tz, tz[src]])
        store = np.concatenate([store, store[src]])
        t = np.concatenate([t, t[src] + delay])
        cents = np.concatenate([cents, np.where(full, cents[src], r_items[:, 0])])
        k = np.concatenate([k, np.where(full, k[src], 1)])
        item_cents = np.concatenate([item_cents, r_items])
        head = np.concatenate([head, head[src]])

    # Order by member, then time: refunds follow their purchase; numbers follow that order.
    order = np.lexsort((t, mem))
    n = len(order)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    first = int(plan.block_tx_start[b]) + 1
    original = (first + position[src]).tolist()
    kinds = np.full(n, plan.txf.purchase_kind, dtype=object)
    kinds[position[n_p:]] = [plan.txf.refund_kind % o for o in original]
    t, tz, k = t[order], tz[order], k[order]
    hour_idx = t // 3600 - plan.hour0
    local = t + plan.off_minutes[tz, hour_idx].astype(np.int64) * 60
    cents, item_cents = cents[order], item_cents[order]
    columns: list[npt.NDArray[Any]] = [
        first + np.arange(n),
        mem[order] + 1,
        kinds,
        cents // 100,
        cents % 100,
        plan.txf.store_channel[store[order]],
        plan.local_hours[local // 3600 - plan.local_hour0],
        plan.min_sec[local % 3600],
        plan.off_strings[plan.off_index[tz, hour_idx]],
    ]
    heads = plan.txf.item_heads[head[order]]
    iu, ic = item_cents // 100, item_cents % 100

    # Format per item count with a fixed template, then restore the row order.
    lines: list[str] = []
    placed: list[I64] = []
    for kk in range(1, MAX_ITEMS + 1):
        rows = np.flatnonzero(k == kk)
        if not len(rows):
            continue
        cols = [c[rows].tolist() for c in columns]
        for j in range(kk):
            cols += [heads[rows, j].tolist(), iu[rows, j].tolist(), ic[rows, j].tolist()]
        template = plan.txf.templates[kk - 1]
        lines.extend([template % values for values in zip(*cols, strict=True)])
        placed.append(rows)
    where = np.empty(n, dtype=np.int64)
    where[np.concatenate(placed)] = np.arange(n)
    return "".join([lines[i] for i in where.tolist()]), n_r


# ---------------------------------------------------------------------------------------
# Blocks, workers, files
# ---------------------------------------------------------------------------------------


class _Writer:
    """Writes the blocks of both files in block order, from any worker process.

    Each worker formats its block, waits until the byte offset of its block is known (the
    previous block's offset plus its size), publishes the offset of the next block and then
    ``pwrite``s its bytes in place. No data goes through pipes or the parent process.
    """

    def __init__(self, paths: Sequence[Path], n_blocks: int, ctx: Any) -> None:
        self.paths = [str(p) for p in paths]
        self.cond = ctx.Condition()
        self.ready = ctx.Array("b", n_blocks + 1, lock=False)
        self.offsets = [ctx.Array("q", n_blocks + 1, lock=False) for _ in paths]
        for p, offsets in zip(paths, self.offsets, strict=True):
            offsets[0] = p.stat().st_size  # after the header
        self.ready[0] = 1

    def write(self, b: int, chunks: Sequence[bytes]) -> None:
        with self.cond:
            while not self.ready[b]:
                self.cond.wait()
            starts = [int(offsets[b]) for offsets in self.offsets]
            for offsets, start, chunk in zip(self.offsets, starts, chunks, strict=True):
                offsets[b + 1] = start + len(chunk)
            self.ready[b + 1] = 1
            self.cond.notify_all()
        for path, start, chunk in zip(self.paths, starts, chunks, strict=True):
            fd = os.open(path, os.O_WRONLY)
            try:
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, start)
                    view, start = view[written:], start + written
            finally:
                os.close(fd)


_PLAN: Plan | None = None  # set before forking workers
_WRITER: _Writer | None = None


@dataclass(frozen=True)
class BlockResult:
    n_members: int
    n_transactions: int
    n_refunds: int


def _run_block(b: int) -> BlockResult:
    plan, writer = _PLAN, _WRITER
    assert plan is not None
    assert writer is not None
    lo = b * BLOCK_MEMBERS
    hi = min(lo + BLOCK_MEMBERS, plan.cfg.members)
    seed = plan.cfg.seed
    m_rng = np.random.default_rng(np.random.SeedSequence([seed, 1, b]))
    t_rng = np.random.default_rng(np.random.SeedSequence([seed, 2, b]))
    members = _members_text(_member_rows(plan, lo, hi, m_rng), plan.cfg.fmt).encode()
    tx, n_refunds = _tx_text(plan, b, lo, hi, t_rng)
    writer.write(b, [members, tx.encode()])
    n_tx = int(plan.block_tx_start[b + 1] - plan.block_tx_start[b])
    return BlockResult(hi - lo, n_tx, n_refunds)


def _results(plan: Plan, paths: Sequence[Path]) -> Iterator[BlockResult]:
    """Runs every block (in worker processes when possible); yields results in order."""
    global _PLAN, _WRITER
    blocks = range(plan.n_blocks)
    workers = min(plan.cfg.workers, plan.n_blocks)
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else None)
    _PLAN, _WRITER = plan, _Writer(paths, plan.n_blocks, ctx)
    try:
        if workers <= 1 or not fork:
            yield from map(_run_block, blocks)
        else:
            with ctx.Pool(workers) as pool:
                yield from pool.imap(_run_block, blocks, chunksize=1)
    finally:
        _PLAN = _WRITER = None


def _header(fields: Sequence[str], fmt: str) -> bytes:
    if fmt != "csv":
        return b""
    buf = io.StringIO()
    csv.writer(buf).writerow(fields)
    return buf.getvalue().encode()


def write_stores(path: Path, stores: list[tuple[str, str, str]], fmt: str) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        if fmt == "csv":
            writer = csv.writer(f)
            writer.writerow(STORE_FIELDS)
            writer.writerows(stores)
        else:
            for row in stores:
                f.write(
                    json.dumps(dict(zip(STORE_FIELDS, row, strict=True)), ensure_ascii=False) + "\n"
                )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def generate(cfg: Config) -> dict[str, Any]:
    began = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    ext = "csv" if cfg.fmt == "csv" else "ndjson"
    paths = {name: cfg.out / f"{name}.{ext}" for name in ("stores", "members", "transactions")}

    stores = make_stores(cfg)
    write_stores(paths["stores"], stores, cfg.fmt)
    plan = make_plan(cfg, stores)
    _log(
        f"planned {cfg.members:,} members, {cfg.transactions:,} transactions in "
        f"{plan.n_blocks} blocks ({time.perf_counter() - began:.1f}s)"
    )

    n_members = n_tx = n_refunds = 0
    last_log = time.perf_counter()
    outputs = [paths["members"], paths["transactions"]]
    for path, fields in zip(outputs, (MEMBER_FIELDS, TRANSACTION_FIELDS), strict=True):
        path.write_bytes(_header(fields, cfg.fmt))
    for done, result in enumerate(_results(plan, outputs), start=1):
        n_members += result.n_members
        n_tx += result.n_transactions
        n_refunds += result.n_refunds
        now = time.perf_counter()
        if now - last_log >= 5.0 or done == plan.n_blocks:
            last_log = now
            _log(
                f"block {done}/{plan.n_blocks}: {n_members:,} members, "
                f"{n_tx:,} transactions ({now - began:.1f}s)"
            )
    seconds = time.perf_counter() - began
    summary: dict[str, Any] = {
        "stores": len(stores),
        "members": n_members,
        "transactions": n_tx,
        "purchases": n_tx - n_refunds,
        "refunds": n_refunds,
        "seconds": round(seconds, 2),
        "files": {name: str(p) for name, p in paths.items()},
        "bytes": {name: p.stat().st_size for name, p in paths.items()},
    }
    return summary


def _positive(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return number


def parse_args(argv: Sequence[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate",
        description="Generate synthetic stores, members and transactions for Patron import.",
    )
    parser.add_argument("--members", type=_positive, required=True)
    parser.add_argument("--transactions", type=_positive, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--stores", type=_positive, default=40, help="physical stores")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2024, 1, 1))
    parser.add_argument(
        "--end", type=date.fromisoformat, default=date(2026, 11, 1), help="exclusive"
    )
    parser.add_argument("--format", dest="fmt", choices=("csv", "ndjson"), default="csv")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=min(os.cpu_count() or 1, 8),
        help="worker processes (the output does not depend on it)",
    )
    args = parser.parse_args(argv)
    if args.end <= args.start + timedelta(days=1):
        parser.error("--end must be more than a day after --start")
    if args.members == 0 and args.transactions:
        parser.error("transactions need at least one member")
    if args.stores == 0:
        parser.error("--stores must be at least 1")
    return Config(
        members=args.members,
        transactions=args.transactions,
        out=args.out,
        seed=args.seed,
        stores=args.stores,
        start=args.start,
        end=args.end,
        fmt=args.fmt,
        workers=max(args.workers, 1),
    )


def main(argv: Sequence[str] | None = None) -> int:
    summary = generate(parse_args(argv))
    _log(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
