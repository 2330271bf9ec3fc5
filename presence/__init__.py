"""Presence: who is online across devices, subscriptions and batched fan-out."""
