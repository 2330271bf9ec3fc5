"""The wake-up policy lab: the real policy on a virtual clock, against models of phones."""
