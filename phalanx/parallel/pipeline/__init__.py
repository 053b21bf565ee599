"""Pipeline parallelism as data: schedules, lowering, a rendezvous simulator, traces.

`schedules` builds per-rank compute orders (GPipe, 1F1B, interleaved 1F1B,
ZB-H1, ZB-V) in torch.distributed.pipelining's action format, each with a
route per micro-batch; `lowering` adds the sends, receives and ZeRO actions
the runtime executes; `simulator` checks a lowered schedule for deadlocks and
data dependencies under rendezvous sends and times it; `trace` draws it.
`runtime` (imported on its own: it needs torch.distributed) runs it.
"""

from phalanx.parallel.pipeline.actions import Action
from phalanx.parallel.pipeline.lowering import NOMINAL_COSTS, lower, peer
from phalanx.parallel.pipeline.schedules import (
    SCHEDULES,
    Schedule,
    ScheduleError,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    read_actions_csv,
    v_placement,
    write_actions_csv,
    zb_h1,
    zb_v,
)
from phalanx.parallel.pipeline.simulator import (
    DeadlockError,
    Event,
    SimResult,
    measured_bubble,
    resolve_costs,
    simulate,
)
from phalanx.parallel.pipeline.trace import plot_timeline, to_chrome_trace

__all__ = [
    "NOMINAL_COSTS", "SCHEDULES", "Action", "DeadlockError", "Event", "Schedule", "ScheduleError",
    "SimResult", "build_schedule", "gpipe", "interleaved_1f1b", "lower", "measured_bubble",
    "one_f_one_b", "peer", "plot_timeline", "read_actions_csv", "resolve_costs", "simulate",
    "to_chrome_trace", "v_placement", "write_actions_csv", "zb_h1", "zb_v",
]
