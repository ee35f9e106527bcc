/* MPI_Allreduce peer benchmark for scripts/bench/allreduce: the same sizes, timing rule and JSON keys as
 * `dtrain bench allreduce --json`, so the two sides compare line by line.
 *
 *   mpicc -O2 -o mpi_allreduce mpi_allreduce.c && mpirun -np 2 ./mpi_allreduce LABEL MIN_BYTES MAX_BYTES
 *
 * float32 sum, in place. Per size: a few warm-up calls, then an iteration count chosen by rank 0 so the timed
 * loop lasts about 0.25 s (every rank uses the same count), time = the slowest rank's mean. Correctness is
 * checked on a separate call with small integer inputs whose sum is exact. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double timeLoop(float* buf, int count, int iters) {
  MPI_Barrier(MPI_COMM_WORLD);
  double t0 = MPI_Wtime();
  for (int i = 0; i < iters; ++i) MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  double mine = (MPI_Wtime() - t0) / iters, slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const char* label = argc > 1 ? argv[1] : "mpi";
  long minBytes = argc > 2 ? atol(argv[2]) : 1024;
  long maxBytes = argc > 3 ? atol(argv[3]) : 64L << 20;
  double budget = argc > 4 ? atof(argv[4]) : 0.25;
  float* buf = aligned_alloc(64, (size_t)maxBytes + 64);
  for (long bytes = minBytes; bytes <= maxBytes; bytes *= 2) {
    int count = (int)(bytes / sizeof(float));
    for (int i = 0; i < count; ++i) buf[i] = 1.0f;
    double warm = timeLoop(buf, count, 3);
    int iters = (int)(budget / (warm > 1e-7 ? warm : 1e-7));
    if (iters < 5) iters = 5;
    if (iters > 20000) iters = 20000;
    MPI_Bcast(&iters, 1, MPI_INT, 0, MPI_COMM_WORLD);
    for (int i = 0; i < count; ++i) buf[i] = 1.0f;
    double t = timeLoop(buf, count, iters);
    for (int i = 0; i < count; ++i) buf[i] = (float)((rank + i) % 7 - 3);
    MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    long wrong = 0, totalWrong = 0;
    for (int i = 0; i < count; ++i) {
      float want = 0;
      for (int r = 0; r < size; ++r) want += (float)((r + i) % 7 - 3);
      if (buf[i] != want) ++wrong;
    }
    MPI_Reduce(&wrong, &totalWrong, 1, MPI_LONG, MPI_SUM, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      double algbw = (double)bytes / t / 1e9;
      printf("{\"backend\": \"%s\", \"bytes\": %ld, \"time_us\": %.3f, \"algbw_gbps\": %.4f, "
             "\"busbw_gbps\": %.4f, \"wrong\": %ld}\n",
             label, bytes, t * 1e6, algbw, algbw * 2.0 * (size - 1) / size, totalWrong);
      fflush(stdout);
    }
  }
  free(buf);
  MPI_Finalize();
  return 0;
}
