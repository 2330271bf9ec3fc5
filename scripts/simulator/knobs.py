"""The scenario's knobs: fleet, traffic, phone behaviour, push loss, network drops, timing."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Distribution:
    """A distribution of delays in seconds, parsed from text such as ``lognormal:0.4,0.6``.

    Forms: ``fixed:S``; ``uniform:LO,HI``; ``exp:MEAN``; ``lognormal:MEDIAN,SIGMA``.
    Every draw is capped at `cap` seconds so one unlucky draw cannot stretch a short run.
    """

    kind: str
    params: tuple[float, ...]
    cap: float = 10.0

    @classmethod
    def parse(cls, text: str, cap: float = 10.0) -> Distribution:
        """Parse the command-line form.

        Raises:
            ValueError: The text names no known distribution or has the wrong parameters.
        """
        kind, _, rest = text.partition(":")
        arity = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}
        if kind not in arity:
            raise ValueError(f"unknown distribution {kind!r} (fixed, uniform, exp, lognormal)")
        try:
            params = tuple(float(p) for p in rest.split(",")) if rest else ()
        except ValueError:
            raise ValueError(f"{text!r}: parameters must be numbers") from None
        if len(params) != arity[kind]:
            raise ValueError(f"{text!r}: {kind} takes {arity[kind]} parameter(s)")
        if any(p < 0 or not math.isfinite(p) for p in params):
            raise ValueError(f"{text!r}: parameters must be finite and not negative")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"{text!r}: uniform needs LO <= HI")
        return cls(kind, params, cap)

    def draw(self, rng: random.Random) -> float:
        """One delay in seconds, in [0, cap]."""
        p = self.params
        if self.kind == "fixed":
            value = p[0]
        elif self.kind == "uniform":
            value = rng.uniform(p[0], p[1])
        elif self.kind == "exp":
            value = rng.expovariate(1 / p[0]) if p[0] > 0 else 0.0
        else:
            value = p[0] * math.exp(rng.gauss(0.0, p[1])) if p[0] > 0 else 0.0
        return min(max(value, 0.0), self.cap)

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{p:g}' for p in self.params)}"


@dataclass(frozen=True, slots=True)
class PushRules:
    """The gateway's `[push]` timing that the scenario runs with (seconds)."""

    urgent_cooldown: float = 1.0
    background_cooldown: float = 3.0
    linger: float = 2.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything that shapes one simulated run. The defaults finish in about 20 s."""

    devices: int = 40
    ios_share: float = 0.5
    web_share: float = 0.0  # browser devices (Web Push); the rest of the fleet are phones
    idle_fraction: float = 0.7
    rate: float = 20.0  # messages per second from the active devices, all together
    duration: float = 12.0  # seconds of traffic
    urgent_share: float = 0.6
    read_share: float = 0.5  # messages the recipient marks read
    reply_share: float = 0.3  # wake-ups after which the phone sends one message itself
    reconnect_delay: Distribution = field(
        default_factory=lambda: Distribution("lognormal", (0.4, 0.6), cap=5.0)
    )
    foreground: Distribution = field(
        default_factory=lambda: Distribution("uniform", (0.3, 2.0), cap=10.0)
    )
    push_loss: float = 0.2  # background wake-ups the provider accepts and never delivers
    alert_loss: float = 0.0  # the same for alerts
    # iOS drops background pushes beyond a budget per device and hour (0: no throttle).
    ios_background_per_hour: int = 3
    # Of the times an idle-cycling app goes to the background, the share in which iOS
    # suspends it with its socket still open: it reads and answers nothing until a push
    # (or the final drain) resumes it, and then starts a new connection.
    zombie_share: float = 0.0
    # Of the sleeping phones' users, the share with a second device (a tablet) that stays
    # connected and marks every message read at once: the user reads on one device while
    # the phone sleeps.
    reader_share: float = 0.0
    drops_per_minute: float = 2.0  # abrupt network drops per connected phone per minute
    rules: PushRules = field(default_factory=PushRules)
    final_drain_timeout: float = 10.0
    final_drain: bool = True
    seed: int = 1
    body_bytes: int = 160
    groups: int = 0  # groups, each of `group_size` phones with at least one active phone
    group_size: int = 0
    group_share: float = 0.3  # of the traffic, sends to a group the sender is in

    def rng(self, stream: str) -> random.Random:
        """An independent, reproducible random stream for one part of the scenario."""
        return random.Random(f"{self.seed}/{stream}")
