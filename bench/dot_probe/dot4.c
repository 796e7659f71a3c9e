/* bench/dot_probe.py builds this: a dot product with four independent accumulators, to measure what pgvector's
 * one-chain loop costs. A probe, not part of gpt-sql. */
#include "postgres.h"
#include "fmgr.h"
#include <immintrin.h>

PG_MODULE_MAGIC;

typedef struct
{
	int32		vl_len_;
	int16		dim;
	int16		unused;
	float		x[FLEXIBLE_ARRAY_MEMBER];
} ProbeVector;

PG_FUNCTION_INFO_V1(dot4);
__attribute__((target("avx2,fma")))
Datum
dot4(PG_FUNCTION_ARGS)
{
	ProbeVector *a = (ProbeVector *) PG_DETOAST_DATUM(PG_GETARG_DATUM(0));
	ProbeVector *b = (ProbeVector *) PG_DETOAST_DATUM(PG_GETARG_DATUM(1));
	int			n = a->dim, i = 0;
	__m256		s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
	float		t[8], sum = 0;

	if (a->dim != b->dim)
		ereport(ERROR, (errmsg("different dimensions")));
	for (; i + 32 <= n; i += 32)
	{
		s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a->x + i), _mm256_loadu_ps(b->x + i), s0);
		s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a->x + i + 8), _mm256_loadu_ps(b->x + i + 8), s1);
		s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a->x + i + 16), _mm256_loadu_ps(b->x + i + 16), s2);
		s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a->x + i + 24), _mm256_loadu_ps(b->x + i + 24), s3);
	}
	_mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
	for (int k = 0; k < 8; k++)
		sum += t[k];
	for (; i < n; i++)
		sum += a->x[i] * b->x[i];
	PG_RETURN_FLOAT8((double) sum);
}
