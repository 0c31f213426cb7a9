"""Continuous batching: which requests run this step, and how many tokens each computes."""
from tierlm.scheduler.scheduler import Scheduler, SchedulerOutput, ScheduledRequest

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerOutput"]
