;; Guix's own client library: a fixed-output derivation `fixed-TAG` (its
;; output the text "hello\n") and `user-TAG`, which uses it, written by a
;; real guix-daemon (not built); prints "drv PATH" of both and writes both
;; .drv files to EXPORT-FILE as an unsigned export archive.
;;   GUIX_DAEMON_SOCKET=SOCKET guile --no-auto-compile -L KIT/src fixed.scm TAG BUSYBOX-DIR EXPORT-FILE
(use-modules (guix store) (guix derivations) (guix base16))
(define args (cdr (command-line)))
(define tag (car args))
(define busybox-dir (cadr args))
(define export-file (caddr args))
(with-store store
  (let* ((bb    (add-to-store store "busybox" #t "sha256" busybox-dir))
         (sh    (string-append bb "/bin/busybox"))
         (fixed (derivation store (string-append "fixed-" tag) sh
                            `("sh" "-c" ,(string-append sh " echo hello > $out"))
                            #:inputs `((,bb))
                            ;; sha256 of "hello\n"
                            #:hash (base16-string->bytevector
                                    "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03")
                            #:hash-algo 'sha256
                            #:system "x86_64-linux"))
         (user  (derivation store (string-append "user-" tag) sh
                            `("sh" "-c" ,(string-append sh " cat " (derivation->output-path fixed) " > $out"))
                            #:inputs `((,fixed) (,bb))
                            #:system "x86_64-linux"
                            #:%deprecation-warning? #f)))
    (format #t "drv ~a~%drv ~a~%" (derivation-file-name fixed) (derivation-file-name user))
    (call-with-output-file export-file
      (lambda (port)
        (export-paths store (list (derivation-file-name fixed) (derivation-file-name user))
                      port #:sign? #f)))))
