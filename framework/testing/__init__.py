"""Test helpers for users and for the project's own tests: the callback contract harness."""

from framework.testing.contract import CHECKS, CallbackContract, ContractViolation, fresh_main_port

__all__ = ["CHECKS", "CallbackContract", "ContractViolation", "fresh_main_port"]
