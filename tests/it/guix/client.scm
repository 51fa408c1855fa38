;; Guix's own client library asking a real guix-daemon to build: adds a
;; directory holding bin/busybox to the store, writes a derivation that runs
;; SCRIPT with busybox's sh, prints "drv PATH" and "out PATH", and with
;; --build asks the daemon to build it (the daemon offers it to its hook
;; first). After ../shared/guix-daemon/client-example.scm, with the script
;; as an argument.
;;   GUIX_DAEMON_SOCKET=SOCKET guile --no-auto-compile -L KIT/src client.scm TAG BUSYBOX-DIR SCRIPT [--build]
(use-modules (guix store) (guix derivations))
(define args (cdr (command-line)))
(define tag (car args))
(define busybox-dir (cadr args))
(define script (caddr args))
(with-store store
  (let* ((bb  (add-to-store store "busybox" #t "sha256" busybox-dir))
         (drv (derivation store (string-append "sandoff-test-" tag)
                          (string-append bb "/bin/busybox")
                          `("sh" "-c" ,script)
                          #:env-vars `(("TAG" . ,tag))
                          #:inputs `((,bb))
                          #:system "x86_64-linux")))
    (format #t "drv ~a~%out ~a~%" (derivation-file-name drv) (derivation->output-path drv))
    (force-output)
    (when (member "--build" args)
      (set-build-options store #:print-build-trace #t #:use-substitutes? #f)
      (build-derivations store (list drv)))))
