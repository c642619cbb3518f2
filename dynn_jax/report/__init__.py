"""Human-readable results: `tables` formats evaluation results and sweep points (pure
functions from results to text and markdown lines), `markdown` assembles the
reproduction report and computes its conclusions from the points, `differences` writes
its "why our numbers differ" section from the configs, the networks and the files the
run read.

Nothing here evaluates, trains or parses flags: a launcher hands the results in and
writes the text out. This package imports none of its modules, so that the training
summary can use `tables` without loading the report (which reads the cost study, which
imports training).
"""
