"""Typed application keys: how handlers reach the leader's parts."""

from __future__ import annotations

from aiohttp import web

from agent.leader.links.upgrades import Rollouts
from agent.leader.pipeline.context import LeaderContext
from agent.leader.pipeline.scheduler import Scheduler

CONTEXT = web.AppKey("context", LeaderContext)
SCHEDULER = web.AppKey("scheduler", Scheduler)
ROLLOUTS = web.AppKey("rollouts", Rollouts)
