;; Guix's own client library asking a real guix-daemon to build a
;; derivation with #:references-graphs: `dep-TAG` (whose output refers to
;; busybox) and `graph-TAG`, which copies its graph files `g` (of dep's
;; output) and `bb` (of busybox, named by a path inside it) to its output.
;; Prints "drv PATH" for both, dep first, then "out PATH" of dep-TAG and
;; of graph-TAG, and writes both .drv files to EXPORT-FILE as an unsigned
;; export archive.
;;   GUIX_DAEMON_SOCKET=SOCKET guile --no-auto-compile -L KIT/src graph.scm TAG BUSYBOX-DIR EXPORT-FILE
(use-modules (guix store) (guix derivations))
(define args (cdr (command-line)))
(define tag (car args))
(define busybox-dir (cadr args))
(define export-file (caddr args))
(with-store store
  (let* ((bb  (add-to-store store "busybox" #t "sha256" busybox-dir))
         (sh  (string-append bb "/bin/busybox"))
         (dep (derivation store (string-append "dep-" tag) sh
                          `("sh" "-c" ,(string-append sh " mkdir $out; " sh " echo " bb " > $out/ref"))
                          #:inputs `((,bb))
                          #:system "x86_64-linux"))
         (drv (derivation store (string-append "graph-" tag) sh
                          `("sh" "-c" ,(string-append sh " mkdir $out; " sh " cp g bb $out/"))
                          #:inputs `((,dep) (,bb))
                          #:references-graphs `(("g" . ,(derivation->output-path dep))
                                                ("bb" . ,(string-append bb "/bin")))
                          #:system "x86_64-linux"
                          #:%deprecation-warning? #f)))
    (format #t "drv ~a~%drv ~a~%out ~a~%out ~a~%"
            (derivation-file-name dep) (derivation-file-name drv)
            (derivation->output-path dep) (derivation->output-path drv))
    (force-output)
    (set-build-options store #:use-substitutes? #f)
    (build-derivations store (list drv))
    (call-with-output-file export-file
      (lambda (port)
        (export-paths store (list (derivation-file-name dep) (derivation-file-name drv))
                      port #:sign? #f)))))
