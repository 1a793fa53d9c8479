"""Observability: experiment trackers, profiler, FLOP counter, GPU health, the HTML run report.

The trainer talks to one `RunObserver` (see `tunesmith.observe.session`); `tunesmith report`
builds the same report for any run directories (`tunesmith.observe.report`).
"""

from tunesmith.observe.session import EVENTS_FILE, REPORT_FILE, RunObserver, StepWatch
from tunesmith.observe.trackers import TRACKERS, Trackers, check_trackers

__all__ = ["EVENTS_FILE", "REPORT_FILE", "TRACKERS", "RunObserver", "StepWatch", "Trackers", "check_trackers"]
