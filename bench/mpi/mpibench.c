/* Point-to-point and collective micro-benchmarks after the OSU micro-benchmarks' method
 * (osu_latency, osu_bw, osu_allreduce, osu_bcast): per message size, warm-up iterations that
 * are not timed, then REPS timed blocks of ITERS iterations; each block gives one value and the
 * program prints the median, minimum and maximum of the blocks. Used by bench/mpi.py, which runs
 * the same binary on the bare host and inside berth containers.
 *
 *   mpibench TESTS MAX_P2P MAX_COLL ITERS WARMUP REPS
 *
 * TESTS: comma-separated of latency,bw,allreduce,bcast. Sizes: 1 B doubling to MAX_P2P (latency,
 * bw) or MAX_COLL (allreduce, bcast). Large messages (> 64 KiB) use ITERS/10 (at least 2), as the
 * OSU suite uses fewer iterations above its large-message threshold.
 *
 * Output, from rank 0, one line per test and size:
 *   RESULT latency SIZE MEDIAN_US MIN_US MAX_US      (one-way: half the round trip)
 *   RESULT bw SIZE MEDIAN_MBS MIN_MBS MAX_MBS         (window of 64 sends, then one ack; MB = 1e6 B)
 *   RESULT allreduce|bcast SIZE MEDIAN_US MIN_US MAX_US (average over ranks of the per-call time)
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WINDOW 64
#define LARGE (64 * 1024)

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void report(const char *test, long size, double *values, int reps) {
    qsort(values, reps, sizeof(double), cmp_double);
    double median = reps % 2 ? values[reps / 2] : (values[reps / 2 - 1] + values[reps / 2]) / 2;
    printf("RESULT %s %ld %.3f %.3f %.3f\n", test, size, median, values[0], values[reps - 1]);
    fflush(stdout);
}

static int iterations(long size, int iters) {
    if (size <= LARGE) return iters;
    return iters / 10 > 2 ? iters / 10 : 2;
}

static double pingpong(char *sbuf, char *rbuf, long size, int count, int rank) {
    double start = MPI_Wtime();
    for (int i = 0; i < count; i++) {
        if (rank == 0) {
            MPI_Send(sbuf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD);
            MPI_Recv(rbuf, (int)size, MPI_CHAR, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            MPI_Recv(rbuf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(sbuf, (int)size, MPI_CHAR, 0, 1, MPI_COMM_WORLD);
        }
    }
    return MPI_Wtime() - start;
}

static double window(char *sbuf, char *rbuf, long size, int count, int rank) {
    MPI_Request requests[WINDOW];
    char ack = 0;
    double start = MPI_Wtime();
    for (int i = 0; i < count; i++) {
        if (rank == 0) {
            for (int w = 0; w < WINDOW; w++)
                MPI_Isend(sbuf, (int)size, MPI_CHAR, 1, 100, MPI_COMM_WORLD, &requests[w]);
            MPI_Waitall(WINDOW, requests, MPI_STATUSES_IGNORE);
            MPI_Recv(&ack, 1, MPI_CHAR, 1, 101, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else if (rank == 1) {
            for (int w = 0; w < WINDOW; w++)
                MPI_Irecv(rbuf, (int)size, MPI_CHAR, 0, 100, MPI_COMM_WORLD, &requests[w]);
            MPI_Waitall(WINDOW, requests, MPI_STATUSES_IGNORE);
            MPI_Send(&ack, 1, MPI_CHAR, 0, 101, MPI_COMM_WORLD);
        }
    }
    return MPI_Wtime() - start;
}

static double collective(const char *test, char *sbuf, char *rbuf, long size, int count) {
    double total = 0;
    for (int i = 0; i < count; i++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double start = MPI_Wtime();
        if (strcmp(test, "allreduce") == 0)
            MPI_Allreduce(sbuf, rbuf, (int)size, MPI_UNSIGNED_CHAR, MPI_SUM, MPI_COMM_WORLD);
        else
            MPI_Bcast(sbuf, (int)size, MPI_CHAR, 0, MPI_COMM_WORLD);
        total += MPI_Wtime() - start;
    }
    return total;
}

int main(int argc, char **argv) {
    int rank, size_world;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size_world);
    if (argc != 7) {
        if (rank == 0) fprintf(stderr, "usage: mpibench TESTS MAX_P2P MAX_COLL ITERS WARMUP REPS\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    long max_p2p = atol(argv[2]), max_coll = atol(argv[3]);
    int iters = atoi(argv[4]), warmup = atoi(argv[5]), reps = atoi(argv[6]);
    long max_size = max_p2p > max_coll ? max_p2p : max_coll;
    char *sbuf = malloc(max_size), *rbuf = malloc(max_size);
    double *values = malloc(sizeof(double) * reps);
    memset(sbuf, 'a', max_size);
    memset(rbuf, 'b', max_size);
    char *tests = strdup(argv[1]);
    for (char *test = strtok(tests, ","); test; test = strtok(NULL, ",")) {
        int p2p = strcmp(test, "latency") == 0 || strcmp(test, "bw") == 0;
        if (p2p && size_world != 2) {
            if (rank == 0) fprintf(stderr, "%s needs exactly 2 ranks\n", test);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
        for (long size = 1; size <= (p2p ? max_p2p : max_coll); size *= 2) {
            int count = iterations(size, iters);
            int warm = iterations(size, warmup);
            for (int rep = -1; rep < reps; rep++) {
                int n = rep < 0 ? warm : count;
                MPI_Barrier(MPI_COMM_WORLD);
                double seconds;
                if (strcmp(test, "latency") == 0) {
                    seconds = pingpong(sbuf, rbuf, size, n, rank);
                    if (rep >= 0) values[rep] = seconds * 1e6 / (2.0 * n);
                } else if (strcmp(test, "bw") == 0) {
                    seconds = window(sbuf, rbuf, size, n, rank);
                    if (rep >= 0) values[rep] = (double)size * WINDOW * n / seconds / 1e6;
                } else if (strcmp(test, "allreduce") == 0 || strcmp(test, "bcast") == 0) {
                    double local = collective(test, sbuf, rbuf, size, n) * 1e6 / n, sum = 0;
                    MPI_Reduce(&local, &sum, 1, MPI_DOUBLE, MPI_SUM, 0, MPI_COMM_WORLD);
                    if (rep >= 0) values[rep] = sum / size_world;
                } else {
                    if (rank == 0) fprintf(stderr, "unknown test %s\n", test);
                    MPI_Abort(MPI_COMM_WORLD, 2);
                }
            }
            if (rank == 0) report(test, size, values, reps);
        }
    }
    free(tests);
    free(values);
    free(sbuf);
    free(rbuf);
    MPI_Finalize();
    return 0;
}
