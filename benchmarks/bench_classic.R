# Called by bench_classic.py: times survey::calibrate on the problem it exported.
#   Rscript benchmarks/bench_classic.R DIR
# DIR holds triplets.csv (target, record, value; 1-based), weights.csv, targets.csv.
# Writes DIR/r_<calfun>_weights.csv and prints one line of timings per calfun.
# R_MAXIT (default 100) sets calibrate's maxit.
suppressPackageStartupMessages({ library(survey); library(Matrix) })
dir <- commandArgs(trailingOnly = TRUE)[1]
maxit <- as.integer(Sys.getenv("R_MAXIT", "100"))
tr <- read.csv(file.path(dir, "triplets.csv"))
w0 <- read.csv(file.path(dir, "weights.csv"))$w
tg <- read.csv(file.path(dir, "targets.csv"))
x <- as.matrix(sparseMatrix(i = tr$record, j = tr$target, x = tr$value,
                            dims = c(length(w0), nrow(tg))))
colnames(x) <- paste0("x", seq_len(ncol(x)))
df <- data.frame(x, w = w0)
design <- svydesign(id = ~1, weights = ~w, data = df)
formula <- as.formula(paste("~ 0 +", paste(colnames(x), collapse = " + ")))
population <- setNames(tg$value, colnames(x))
for (calfun in c("linear", "raking")) {
  times <- c()
  for (rep in 1:3) {
    t0 <- proc.time()[["elapsed"]]
    cal <- calibrate(design, formula, population, calfun = calfun, epsilon = 1e-10, maxit = maxit)
    times <- c(times, proc.time()[["elapsed"]] - t0)
  }
  write.csv(data.frame(w = weights(cal)), file.path(dir, paste0("r_", calfun, "_weights.csv")),
            row.names = FALSE)
  cat(sprintf("R %s %s\n", calfun, paste(sprintf("%.3f", times), collapse = " ")))
}
