"""Reports: grouping cells into configurations, tables, plots and the paper's analyses, from
result files or MLflow."""
