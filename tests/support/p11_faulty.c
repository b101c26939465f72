/*
 * A PKCS#11 module for tests/pkcs11.rs: SoftHSM2 with the outages a test
 * asks for, as a token pulled out or a network HSM that lost its link
 * answers them.
 *
 * Every function is the real module's (the .so named by P11FAULTY_MODULE),
 * except C_Decrypt and C_DeriveKey: while the file named by
 * P11FAULTY_COUNT says "C_Decrypt N" (or "C_DeriveKey N") with N above
 * zero, that function fails with CKR_DEVICE_REMOVED, and each failure
 * takes one off N. A C_Decrypt that fails has been done by the real
 * module first (so the session holds no half-done operation), its output
 * wiped. The test compiles this file with the system's cc and p11-kit's
 * pkcs11.h.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <p11-kit/pkcs11.h>

static CK_FUNCTION_LIST ours;
static CK_FUNCTION_LIST_PTR real;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* Whether this call of `function` is to fail: one off the count when so. */
static int fault(const char *function) {
    const char *path = getenv("P11FAULTY_COUNT");
    char named[32] = "";
    long left = 0;
    int hit = 0;
    FILE *f;
    if (path == NULL) {
        return 0;
    }
    pthread_mutex_lock(&lock);
    f = fopen(path, "r");
    if (f != NULL) {
        if (fscanf(f, "%31s %ld", named, &left) != 2 || strcmp(named, function) != 0) {
            left = 0;
        }
        fclose(f);
    }
    if (left > 0) {
        hit = 1;
        f = fopen(path, "w");
        if (f != NULL) {
            fprintf(f, "%s %ld\n", function, left - 1);
            fclose(f);
        }
    }
    pthread_mutex_unlock(&lock);
    return hit;
}

static CK_RV faulty_decrypt(CK_SESSION_HANDLE session, CK_BYTE_PTR in, CK_ULONG in_len,
                            CK_BYTE_PTR out, CK_ULONG_PTR out_len) {
    CK_RV rv = real->C_Decrypt(session, in, in_len, out, out_len);
    /* A length query (no output buffer) leaves the operation going. */
    if (out == NULL || rv != CKR_OK || !fault("C_Decrypt")) {
        return rv;
    }
    memset(out, 0, *out_len);
    return CKR_DEVICE_REMOVED;
}

static CK_RV faulty_derive(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism,
                           CK_OBJECT_HANDLE base, CK_ATTRIBUTE_PTR template,
                           CK_ULONG count, CK_OBJECT_HANDLE_PTR key) {
    if (fault("C_DeriveKey")) {
        return CKR_DEVICE_REMOVED;
    }
    return real->C_DeriveKey(session, mechanism, base, template, count, key);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    if (real == NULL) {
        const char *module = getenv("P11FAULTY_MODULE");
        void *lib = module == NULL ? NULL : dlopen(module, RTLD_NOW | RTLD_LOCAL);
        CK_C_GetFunctionList get;
        if (lib == NULL) {
            return CKR_GENERAL_ERROR;
        }
        get = (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList");
        if (get == NULL || get(&real) != CKR_OK) {
            return CKR_GENERAL_ERROR;
        }
        ours = *real;
        ours.C_GetFunctionList = C_GetFunctionList;
        ours.C_Decrypt = faulty_decrypt;
        ours.C_DeriveKey = faulty_derive;
    }
    *list = &ours;
    return CKR_OK;
}
