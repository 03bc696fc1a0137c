"""The job runtime: jobs run in their own app context against the real Redis."""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker

from service import jobs
from service.config import Config
from service.redis_client import make_redis


@pytest.fixture
def job_env(config: Config, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setenv("DATABASE_URL", config.database_url or "")
    monkeypatch.setenv("REDIS_URL", config.redis_url or "")
    monkeypatch.setattr(jobs, "_APP", None)
    return config


def test_scheduler_once_enqueues_periodic_jobs_and_a_worker_runs_them(job_env: Config):
    redis = make_redis(job_env.redis_url or "")
    queue_name = "test-periodic"
    redis.delete("patron:heartbeat")
    jobs.run_scheduler(
        Config(
            database_url=job_env.database_url, redis_url=job_env.redis_url, queue_name=queue_name
        ),
        once=True,
    )
    queue = Queue(queue_name, connection=redis)
    assert queue.count == len(jobs.PERIODIC)
    SimpleWorker([queue], connection=redis).work(burst=True)
    assert queue.count == 0
    assert redis.get("patron:heartbeat") is not None
    queue.delete(delete_jobs=True)
