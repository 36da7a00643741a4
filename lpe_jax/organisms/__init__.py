"""Toy organisms with exact truth: tiny model pairs the project trains and ships (`assets/`).

`toy` is the default pair (`make demo`); `toy2` is the second organism, with longer answers and
curves that bend. Each gives r(alpha) exactly by enumeration, so estimators are scored against
the truth rather than against a larger sample.
"""
