"""Sieve (RFC 5228 and extensions): filtering at local delivery.

parser (scripts -> Script, with line-numbered errors), interpreter (a Script, a message
and its envelope -> actions), actions (what both sides agree an action means): these
import nothing from Twisted.  scripts (Pigeonhole's on-disk layout), delivery (carrying
the actions out) and vacation (what was answered, remembered) are the server side.
"""
