"""The lab: measurement and evaluation code the product never imports.

Benchmarks of every stage (`bench`, `bench_suite`, `bench_score`, `bench_ivf`), the load test, the Flickr8k
noisy-correspondence evaluation and the demo live here, with what they share: one machine description and one
peak-RSS reading (`machine`), one synthetic-data maker (`synthetic`), one AUROC (`metrics`) and one place their
figures go (`output`). `pipeline/`, `models/` and `flows/` never import this package; the lab imports them.
"""
