"""The benchmark API: sweeps over datasets, recipes, models and folds; the efficiency profiler; aggregation
into tables and plots; the parameter table and the GPU-hours estimate."""
