/* bench/dot_probe.py builds this: a dot product with four independent accumulators, to measure what pgvector's
 * one-chain loop costs. A probe, not part of gpt-sql. */
#include "postgres.h"
#include "fmgr.h"
#include "utils/array.h"
#include "catalog/pg_type.h"
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

/* matvec(hs vector[], ws vector[]) -> vector[]: for each h of hs, the vector of its products with every w of ws, in
 * order; each weight row is taken against every position while it is in cache, each product with four
 * accumulators. What a kernel of our own could do for a several-position linear. */
PG_FUNCTION_INFO_V1(matvec);
__attribute__((target("avx2,fma")))
Datum
matvec(PG_FUNCTION_ARGS)
{
	ArrayType  *ha = PG_GETARG_ARRAYTYPE_P(0);
	ArrayType  *wa = PG_GETARG_ARRAYTYPE_P(1);
	Oid			vtype = ARR_ELEMTYPE(ha);
	Datum	   *hd, *wd, *out;
	bool	   *hn, *wn;
	int			np, nw, dim;
	ProbeVector **ys;

	deconstruct_array(ha, vtype, -1, false, TYPALIGN_INT, &hd, &hn, &np);
	deconstruct_array(wa, vtype, -1, false, TYPALIGN_INT, &wd, &wn, &nw);
	if (np == 0 || nw == 0)
		ereport(ERROR, (errmsg("empty array")));
	dim = ((ProbeVector *) DatumGetPointer(hd[0]))->dim;
	ys = palloc(sizeof(ProbeVector *) * np);
	out = palloc(sizeof(Datum) * np);
	for (int p = 0; p < np; p++)
	{
		ys[p] = palloc0(offsetof(ProbeVector, x) + sizeof(float) * nw);
		SET_VARSIZE(ys[p], offsetof(ProbeVector, x) + sizeof(float) * nw);
		ys[p]->dim = nw;
		out[p] = PointerGetDatum(ys[p]);
	}
	for (int n = 0; n < nw; n++)
	{
		ProbeVector *w = (ProbeVector *) DatumGetPointer(wd[n]);

		if (w->dim != dim)
			ereport(ERROR, (errmsg("different dimensions")));
		for (int p = 0; p < np; p++)
		{
			const float *h = ((ProbeVector *) DatumGetPointer(hd[p]))->x;
			__m256		s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
			float		t[8], sum = 0;
			int			i = 0;

			for (; i + 32 <= dim; i += 32)
			{
				s0 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i), _mm256_loadu_ps(w->x + i), s0);
				s1 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i + 8), _mm256_loadu_ps(w->x + i + 8), s1);
				s2 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i + 16), _mm256_loadu_ps(w->x + i + 16), s2);
				s3 = _mm256_fmadd_ps(_mm256_loadu_ps(h + i + 24), _mm256_loadu_ps(w->x + i + 24), s3);
			}
			_mm256_storeu_ps(t, _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
			for (int k = 0; k < 8; k++)
				sum += t[k];
			for (; i < dim; i++)
				sum += h[i] * w->x[i];
			ys[p]->x[n] = sum;
		}
	}
	PG_RETURN_ARRAYTYPE_P(construct_array(out, np, vtype, -1, false, TYPALIGN_INT));
}
